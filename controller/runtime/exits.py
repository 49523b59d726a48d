"""Why a backend exited, in words an operator can act on (pure; shared by every runtime)."""

from __future__ import annotations

import signal

ILLEGAL_INSTRUCTION_HELP = (
    "llama-server crashed with an illegal instruction (SIGILL): it was built for CPU features this machine "
    "cannot run (for example AMX or AVX-512 kernels from a -march=native build made elsewhere, or on a "
    "virtual machine that advertises AMX but faults on it). Rebuild it portable with scripts/bootstrap.sh "
    "(CPU variants chosen at run time), or set llama_server.binary to a build made for this CPU; "
    "see docs/troubleshooting.md"
)

_SIGNAL_HELP = {
    signal.SIGILL: ILLEGAL_INSTRUCTION_HELP,
    signal.SIGKILL: "llama-server was killed (SIGKILL): out of memory, or stopped by someone else",
    signal.SIGSEGV: "llama-server crashed (SIGSEGV, a segmentation fault); its log may say why",
    signal.SIGBUS: "llama-server crashed (SIGBUS): the model file may have changed or been truncated while in use",
    signal.SIGABRT: "llama-server aborted (SIGABRT); its log says why",
    signal.SIGFPE: "llama-server crashed (SIGFPE, an arithmetic fault)",
}


def describe_signal(number: int) -> str:
    try:
        signum = signal.Signals(number)
    except ValueError:
        return f"llama-server was killed by signal {number}"
    return _SIGNAL_HELP.get(signum, f"llama-server was killed by {signum.name}")


def describe_exit(code: int | None) -> str:
    """``code`` as ``Popen.returncode`` gives it: negative for a signal; 128+N from a shell or container."""
    if code is None:
        return "llama-server exited"
    if code < 0:
        return describe_signal(-code)
    if code > 128 and code - 128 in (int(s) for s in _SIGNAL_HELP):
        return describe_signal(code - 128)
    return f"llama-server exited with code {code}"
