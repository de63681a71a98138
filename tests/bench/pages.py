"""Page sources for the benchmarks: real process memory and synthetic mixes.

Real pages are what a swap device would be handed: the resident pages of private anonymous
(or privately written, copy-on-write) mappings of running processes, read through
``/proc/PID/maps`` + ``/proc/PID/pagemap`` + ``/proc/PID/mem`` (needs root or ptrace rights;
unreadable processes and regions are skipped). A quiet machine may not hold enough of them,
so :func:`spawn_ballast` can start a real workload (a Python interpreter parsing and compiling
the standard library, keeping the trees) whose heap then counts as real pages too.

Synthetic mixes give a set compressibility: fractions of zero, same-filled, text-like,
half-random and random pages, deterministic for a seed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

PAGE = 4096
MIB = 1 << 20
_PRESENT = 1 << 63
_SWAPPED = 1 << 62


@dataclass
class RealPages:
    data: bytes
    pids: list[int] = field(default_factory=list)
    regions: int = 0
    unreadable_regions: int = 0
    skipped_processes: int = 0

    @property
    def pages(self) -> int:
        return len(self.data) // PAGE


def _anonymous_like(perms: str, path: str) -> bool:
    """Private mappings whose pages a swap device could be handed."""
    if len(perms) < 4 or perms[0] != "r" or perms[3] != "p":
        return False
    if path in ("[vvar]", "[vsyscall]", "[vdso]", "[vvar_vclock]"):
        return False
    if not path or path.startswith("[") or path.startswith("/memfd:"):
        return True  # anonymous, heap, stack, [anon:name]
    return perms[1] == "w"  # written private file pages (.data, .bss) are anonymous copies


def _excluded(pid: int) -> bool:
    """Skip init and processes without an executable on disk (memfd or deleted binaries:
    sealed helpers of whatever manages the machine, not a workload)."""
    if pid in (1, os.getpid()):
        return True
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return True  # kernel threads and processes we may not inspect
    return exe.startswith("/memfd:") or exe.endswith(" (deleted)")


def _regions(pid: int) -> list[tuple[int, int]]:
    out = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            path = parts[5].strip() if len(parts) > 5 else ""
            if _anonymous_like(parts[1], path):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end))
    return out


def _resident_runs(pagemap, start: int, end: int) -> Iterable[tuple[int, int]]:
    """(address, page count) runs of present or swapped pages in [start, end)."""
    count = (end - start) // PAGE
    pagemap.seek(start // PAGE * 8)
    raw = pagemap.read(count * 8)
    entries = array("Q")
    entries.frombytes(raw[: len(raw) // 8 * 8])
    run_start = -1
    for i, entry in enumerate(entries):
        if entry & (_PRESENT | _SWAPPED):
            if run_start < 0:
                run_start = i
        elif run_start >= 0:
            yield start + run_start * PAGE, i - run_start
            run_start = -1
    if run_start >= 0:
        yield start + run_start * PAGE, len(entries) - run_start


def gather_real_pages(limit: int, pids: Iterable[int] | None = None) -> RealPages:
    """Up to ``limit`` bytes of resident private/anonymous pages of running processes."""
    if pids is None:
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    chunks: list[bytes] = []
    total = 0
    result = RealPages(b"")
    for pid in pids:
        if total >= limit:
            break
        if _excluded(pid):
            result.skipped_processes += 1
            continue
        try:
            regions = _regions(pid)
            pagemap = open(f"/proc/{pid}/pagemap", "rb", buffering=0)  # noqa: SIM115
            mem = open(f"/proc/{pid}/mem", "rb", buffering=0)  # noqa: SIM115
        except OSError:
            result.skipped_processes += 1
            continue
        took = 0
        with pagemap, mem:
            for start, end in regions:
                if total >= limit:
                    break
                result.regions += 1
                try:
                    runs = list(_resident_runs(pagemap, start, end))
                except OSError:
                    result.unreadable_regions += 1
                    continue
                for address, count in runs:
                    want = min(count * PAGE, limit - total)
                    if want <= 0:
                        break
                    try:
                        mem.seek(address)
                        data = mem.read(want)
                    except OSError:
                        result.unreadable_regions += 1
                        break
                    data = data[: len(data) // PAGE * PAGE]
                    chunks.append(data)
                    total += len(data)
                    took += len(data)
        if took:
            result.pids.append(pid)
    result.data = b"".join(chunks)
    return result


_BALLAST = r"""
import ast, os, sys, sysconfig
target = int(sys.argv[1])
keep = []
size = 0
root = sysconfig.get_paths()["stdlib"]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
done = False
for _round in range(8):
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    src = f.read()
                tree = ast.parse(src)
                code = compile(tree, name, "exec")
            except (SyntaxError, ValueError, UnicodeDecodeError, OSError, RecursionError):
                continue
            keep.append((name, src, tree, code, {n.id: n for n in ast.walk(tree)
                                                 if isinstance(n, ast.Name)}))
            if len(keep) % 50 == 0 and rss() >= target:
                done = True
                break
        if done:
            break
    if done:
        break
print("ready", rss(), flush=True)
sys.stdin.read()
"""


def spawn_ballast(size: int) -> subprocess.Popen:
    """Start a real workload holding about ``size`` bytes of heap; kill it when done."""
    proc = subprocess.Popen([sys.executable, "-c", _BALLAST, str(size)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError("ballast workload did not start")
    return proc


def stop_ballast(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


# -- synthetic mixes ------------------------------------------------------------------------
_WORDS_TEXT = ("the of and to in is that for it as was with be by on not he this are or his "
               "from at which but have an they you were her she there been one all we their "
               "has would when "
               "page memory swap compressed device pool kernel zram zswap write read cgroup node "
               "struct int return if else while static void unsigned long const char size_t")


def _text_corpus(rng: random.Random, size: int) -> bytes:
    words = _WORDS_TEXT.split()
    out = []
    n = 0
    while n < size:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        line = f"{rng.randint(0, 99999):5d} {line}\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


# name -> fraction; fractions need not sum to 1 (they are normalised)
DEFAULT_MIX = {"zero": 0.15, "same": 0.05, "text": 0.45, "half": 0.25, "random": 0.10}
CHURN_MIX = {"zero": 0.05, "same": 0.0, "text": 0.25, "half": 0.40, "random": 0.30}


def synthetic_pages(count: int, mix: dict[str, float] | None = None, seed: int = 1) -> bytes:
    """``count`` pages drawn from ``mix``: zero, same (repeated 8-byte word), text
    (text-like, ~3-4:1 with zstd), half (half random, half zero) and random pages."""
    mix = DEFAULT_MIX if mix is None else mix
    rng = random.Random(seed)
    unknown = set(mix) - {"zero", "same", "text", "half", "random"}
    if unknown:
        raise ValueError(f"unknown page kinds {sorted(unknown)}")
    kinds = [k for k, f in mix.items() if f > 0]
    weights = [mix[k] for k in kinds]
    corpus = _text_corpus(rng, 1 * MIB)
    zero = bytes(PAGE)
    pages = []
    for kind in rng.choices(kinds, weights, k=count):
        if kind == "zero":
            pages.append(zero)
        elif kind == "same":
            pages.append(rng.getrandbits(64).to_bytes(8, "little") * (PAGE // 8))
        elif kind == "text":
            at = rng.randrange(0, len(corpus) - PAGE)
            pages.append(corpus[at:at + PAGE])
        elif kind == "half":
            cut = rng.randrange(PAGE // 4, 3 * PAGE // 4) & ~7
            pages.append(rng.randbytes(cut) + bytes(PAGE - cut))
        else:
            pages.append(rng.randbytes(PAGE))
    return b"".join(pages)


def describe(data: bytes) -> dict[str, int]:
    """Counts of zero and same-filled pages (the ones zram stores for free)."""
    zero = same = 0
    zpage = bytes(PAGE)
    for i in range(0, len(data), PAGE):
        page = data[i:i + PAGE]
        if page == zpage:
            zero += 1
        elif page == page[:8] * (PAGE // 8):
            same += 1
    return {"pages": len(data) // PAGE, "zero": zero, "same": same}
