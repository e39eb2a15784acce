"""Helpers shared by the distsparse benchmarks (no torch import at module level).

Memory is measured with the kernel's own counters: writing ``5`` to
``/proc/self/clear_refs`` resets the peak resident set size (VmHWM) to the current
RSS, so ``VmHWM`` read after an operation minus ``VmRSS`` read before it is the
peak memory growth *during* that operation, including allocations that were freed
again before it returned.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

ONE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def proc_status_kb(key: str) -> int:
    """Value of ``key`` (e.g. ``VmRSS``, ``VmHWM``) in /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS. Returns False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_env() -> dict:
    env = dict(os.environ)
    env.update(ONE_THREAD_ENV)
    # make `import distsparse` and `import _common` work from a fresh interpreter
    paths = [REPO_ROOT, os.path.dirname(os.path.abspath(__file__))]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: str, mode: str, world: int, cfg: dict, timeout: float) -> list[dict]:
    """``world`` fresh processes running ``script --child <cfg + mode>`` as ranks of one
    torch.distributed job (env:// rendezvous on a free port), with a hard ``timeout`` for
    all. Each rank's last ``RESULT <json>`` line is its result; a rank without one gives
    ``{"rank", "error"}`` with the tail of its output."""
    port = free_port()
    tmp = tempfile.mkdtemp(prefix=f"distsparse_bench_{mode}_")
    procs = []
    for rank in range(world):
        env = child_env()
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        out = open(os.path.join(tmp, f"rank{rank}.out"), "w+")
        cmd = [sys.executable, os.path.abspath(script), "--child", json.dumps({**cfg, "mode": mode})]
        procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), out))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p, _ in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for p, _ in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    results = []
    for rank, (p, out) in enumerate(procs):
        out.seek(0)
        text = out.read()
        out.close()
        lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        if lines:
            results.append(json.loads(lines[-1][len("RESULT "):]))
        else:
            why = f"timed out after {timeout:.0f} s" if timed_out else f"exit {p.returncode}"
            results.append(dict(rank=rank, error=f"{why}: " + " / ".join(text.strip().splitlines()[-12:])))
        os.remove(os.path.join(tmp, f"rank{rank}.out"))
    os.rmdir(tmp)
    return results


def machine_info() -> dict:
    import torch  # parent only; cheap enough

    cpu_model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip() or "?"
        dirty = subprocess.run(
            ["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "distsparse"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        if dirty:
            commit += " (distsparse/ has uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "load": load,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "mem_gib": mem_gib,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "git": commit,
    }


def machine_info_md(info: dict) -> str:
    mem = f"{info['mem_gib']:.1f} GiB" if info.get("mem_gib") else "?"
    return (
        f"- CPU: {info['cpu_model']}; os.cpu_count() = {info['cpu_count']}, "
        f"usable = {info['cpus_usable']}; RAM {mem}; load average at start "
        f"(1/5/15 min) {info['load']}\n"
        f"- Python {info['python']}, torch {info['torch']}, {info['platform']}\n"
        f"- repo commit: {info['git']}\n"
    )


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_report(md: list[str], out: str, total_seconds: float) -> None:
    """Append the closing line, print the markdown report and write it to ``out``."""
    md.append(f"\nTotal benchmark wall time: {total_seconds:.0f} s; load average at the end "
              f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}.\n")
    text = "\n".join(md)
    print(text, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"written to {os.path.relpath(out)}", file=sys.stderr)


def timed_step(sp) -> tuple[float, float, int]:
    """One ``sp.step()``: (wall seconds, process CPU seconds, peak RSS growth in kB).

    The kernel's peak RSS (VmHWM) is reset right before the call, so the growth is the most
    extra memory resident at any moment during it, temporaries included.
    """
    import time

    rss_before = proc_status_kb("VmRSS")
    reset_peak_rss()
    c0 = time.process_time()
    t0 = time.perf_counter()
    sp.step()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return wall, cpu, proc_status_kb("VmHWM") - rss_before
