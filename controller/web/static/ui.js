// The page's own script (no inline scripts: the Content-Security-Policy forbids them). Everything here is an
// extra: without JavaScript every page still works (forms, links, a reload for the latest log lines).
"use strict";

function setUpCopyButtons() {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    const field = document.getElementById(button.dataset.copy);
    if (!field) continue;
    button.hidden = false;
    button.addEventListener("click", async () => {
      field.select();
      try {
        await navigator.clipboard.writeText(field.value);
        button.textContent = "Copied";
      } catch {
        button.textContent = "Press Ctrl+C";
      }
    });
  }
}

function setUpLogFollow() {
  const log = document.getElementById("log");
  if (!log || !log.dataset.stream) return;
  const filter = document.getElementById("log-filter");
  const pause = document.getElementById("log-pause");
  filter.hidden = false;
  pause.hidden = false;
  let paused = false;
  let waiting = [];
  const matches = (text) => !filter.value || text.toLowerCase().includes(filter.value.toLowerCase());
  const atBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  const add = (text) => {
    const keepScrolled = atBottom();
    const line = document.createElement("span");
    line.className = matches(text) ? "line" : "line hidden";
    line.textContent = text;
    log.append(line);
    while (log.childElementCount > 5000) log.firstElementChild.remove();
    if (keepScrolled) log.scrollTop = log.scrollHeight;
  };
  filter.addEventListener("input", () => {
    for (const line of log.querySelectorAll(".line")) line.classList.toggle("hidden", !matches(line.textContent));
  });
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) { waiting.forEach(add); waiting = []; }
  });
  const source = new EventSource(log.dataset.stream);
  source.onmessage = (event) => {
    const text = JSON.parse(event.data);
    if (paused) waiting.push(text); else add(text);
  };
  log.scrollTop = log.scrollHeight;
}

document.addEventListener("DOMContentLoaded", () => {
  setUpCopyButtons();
  setUpLogFollow();
});
