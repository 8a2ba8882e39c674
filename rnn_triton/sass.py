"""Read a compiled sm_90 kernel's SASS: its loops and, per loop iteration, what it issues.

``analyze(cubin, tags)`` disassembles with the ``nvdisasm`` shipped in the triton wheel (``-c -g
-hex``: code, source lines, encodings) and returns, for every loop (a backward branch and its target),
the instructions one iteration issues per warp, outside its inner loops:

- ``count``: instructions by class (``mma``, ``ldsm``, ``lds``, ``sts``, ``ldg``, ``stg``, ``atom``,
  ``mufu``, ``fp``, ``membar``, ``bar``, ``other``), ``total``, and ``ffma`` (the scalar FMAs among
  ``fp``, which carry a dot that runs without tensor cores);
- ``mma``: tensor-core instructions by opcode (``HMMA.16816.F32.BF16``, ``HGMMA.64x16x16.F32.BF16``...),
  and ``macs``: the multiply-adds one warp's issue of them performs (a warpgroup instruction's MMA
  counted a quarter per warp, since its four warps issue it together);
- ``bytes``: shared memory read (LDS, LDSM, and the wgmma operands read from shared memory), shared
  written, global loaded (LDG, and LDGSTS: cp.async) and stored, local memory (spills: LDL, STL), per
  warp; ``ldg_qualifiers``: global loads by opcode;
- ``round_trips``: the global-memory round trips on the iteration's path: how many times execution
  waits (scoreboard wait bits in the encoding) for a global load issued since the previous such wait.
  Loads issued back to back and waited for together count once; a load issued only after the previous
  one's data arrived counts again. Simulated over two iterations, so a load issued in one iteration for
  the next counts where it is waited for. Not seen: a wait in another loop than the load's (each loop
  body is simulated alone), and cp.async (LDGSTS), which completes through DEPBAR, not the scoreboard
  wait bits (this project's kernels issue none: num_stages=1);
- ``tags``: instructions whose source line lies in a tagged function (``tags``: {tag: [(file, first
  line, last line)]}), by tag and class: e.g. global loads of W_hh inside a loop;
- ``serial``: the serial chain, one warp's issue time of an iteration alone (``serial_cycles``), low and
  high, with spill reloads from L1 and from L2;
- ``release``: for a loop holding a ``MEMBAR.*.GPU`` (the release of a grid barrier's arrival), the
  global stores issued in the iteration before it (which the release waits for) and after it.

Counts are per thread, i.e. per warp instruction: every warp issues every instruction of a loop body
(Triton emits no warp-specialised code here), so a CTA issues ``num_warps`` times as many.

The control bits decoded (sm_70 and later, bits 105-125 of each 128-bit instruction; Jia et al.,
"Dissecting the NVIDIA Volta GPU Architecture via Microbenchmarking", arXiv 1804.06826): stall, yield,
write scoreboard, read scoreboard, wait mask, reuse (the layout described by the open-source Volta+
assemblers, e.g. CuAssembler and TuringAs; checked here against S2R/LDG/LDS producers and their
consumers).
"""
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Optional



def _code_hash(path: str) -> str:
    """A hash of a module's code, not of its comments and docstrings: editing prose invalidates nothing."""
    import ast
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


#: The analysis' version: results cached under another one are read again from their cubin.
VERSION = _code_hash(__file__)


@dataclass
class Instr:
    addr: int
    opcode: str
    operands: str
    predicated: bool
    file: str
    line: int
    wr_sb: int   # scoreboard this instruction's result sets (7: none)
    wait: int    # scoreboards it waits for, a 6-bit mask
    target: Optional[str] = None  # branch target label
    stall: int = 1  # cycles before the warp's next instruction may issue (fixed-latency dependencies)
    rd_sb: int = 7  # scoreboard released when its operands have been read (7: none)


@dataclass
class Loop:
    start: int
    end: int
    parent: Optional[int] = None
    children: list = field(default_factory=list)


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;\s*/\*\s*0x([0-9a-f]+)\s*\*/")
_HI = re.compile(r"^\s*/\*\s*0x([0-9a-f]+)\s*\*/\s*$")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", "-g", "-hex", f.name], capture_output=True, text=True,
                              check=True).stdout


def parse(text: str):
    """(instructions in address order, {label: address})."""
    instrs, labels = [], {}
    file, line = "", 0
    pending_labels = []
    lines = text.splitlines()
    for i, raw in enumerate(lines):
        m = _LINE.search(raw)
        if m:
            file, line = os.path.basename(m.group(1)), int(m.group(2))
            continue
        m = _LABEL.match(raw.strip())
        if m:
            pending_labels.append(m.group(1))
            continue
        m = _INSTR.match(raw)
        if not m:
            continue
        hi = _HI.match(lines[i + 1]) if i + 1 < len(lines) else None
        if hi is None:  # without it the control bits would read as zeros: scoreboard 0, no wait
            raise ValueError(f"no second encoding word after {raw.strip()!r}: disassemble with -hex")
        ctrl = int(hi.group(1), 16) >> 41
        addr = int(m.group(1), 16)
        for label in pending_labels:
            labels[label] = addr
        pending_labels = []
        target = _TARGET.search(m.group(4))
        instrs.append(Instr(addr, m.group(3), m.group(4), m.group(2) is not None, file, line,
                            wr_sb=(ctrl >> 5) & 7, wait=(ctrl >> 11) & 0x3f,
                            target=target.group(1) if target else None, stall=ctrl & 0xf, rd_sb=(ctrl >> 8) & 7))
    return instrs, labels


def find_loops(instrs, labels) -> list:
    """Loops from backward branches, outermost first, with their nesting (a jump to itself, the trap
    after EXIT, is no loop)."""
    spans = sorted({(labels[i.target], i.addr) for i in instrs
                    if i.opcode.startswith("BRA") and i.target in labels and labels[i.target] < i.addr},
                   key=lambda s: (s[0], -s[1]))
    loops = [Loop(a, b) for a, b in spans]
    for k, loop in enumerate(loops):
        enclosing = [j for j, o in enumerate(loops) if j != k and o.start <= loop.start and loop.end <= o.end
                     and (o.start, o.end) != (loop.start, loop.end)]
        if enclosing:
            loop.parent = min(enclosing, key=lambda j: loops[j].end - loops[j].start)
            loops[loop.parent].children.append(k)
    return loops


def classify(op: str) -> str:
    base = op.split(".")[0]
    if base in ("HMMA", "HGMMA", "DMMA", "IMMA", "BMMA"):
        return "mma"
    if base in ("LDSM",):
        return "ldsm"
    if base in ("LDS",):
        return "lds"
    if base in ("STS", "STSM"):
        return "sts"
    if base in ("LDG", "LD", "LDGSTS"):  # LDGSTS: cp.async, global to shared
        return "ldg"
    if base in ("LDL", "STL"):  # spilled registers: local memory, through L1
        return "local"
    if base in ("STG", "ST"):
        return "stg"
    if base in ("ATOMG", "REDG", "RED", "ATOM"):
        return "atom"
    if base == "MUFU":
        return "mufu"
    if base in ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "FCHK", "FSET", "HFMA2", "HMUL2", "HADD2",
                "DFMA", "DMUL", "DADD"):
        return "fp"
    if base == "MEMBAR":
        return "membar"
    if base == "BAR":
        return "bar"
    return "other"


_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
_ELEM = {"BF16": 2, "F16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1, "U8": 1}


def access_bytes(op: str) -> int:
    """Bytes one thread moves with a load or store (LDSM: its share of the warp's 8x8 matrices)."""
    parts = op.split(".")
    if parts[0] in ("LDSM", "STSM"):
        return 4 * (int(parts[-1]) if parts[-1].isdigit() else 1)  # 8x8 16-bit matrices x count / 32 lanes
    for p in parts[1:]:
        if p in _WIDTH:
            return _WIDTH[p]
    return 4


def mma_shape(op: str):
    """(m, n, k, element bytes) of a tensor-core opcode, per instruction (HMMA: per warp; HGMMA: per
    warpgroup)."""
    parts = op.split(".")
    elem = next((_ELEM[p] for p in parts[2:] if p in _ELEM), 2)
    if parts[0] == "HGMMA":
        m, n, k = (int(v) for v in parts[1].split("x"))
        return m, n, k, elem
    code = parts[1]  # HMMA.16816 = m16 n8 k16, HMMA.1688 = m16 n8 k8, HMMA.16832 = m16 n8 k32
    return 16, 8, int(code[3:]), elem


def _tag_of(instr: Instr, tags) -> Optional[str]:
    for tag, spans in tags.items():
        for file, first, last in spans:
            if instr.file == file and first <= instr.line <= last:
                return tag
    return None


def _is_global_load(instr: Instr) -> bool:
    return classify(instr.opcode) == "ldg" or instr.opcode.startswith("ATOMG")


def _round_trips(body, tags) -> int:
    """Global round trips on one iteration's path (see the module docstring). Loads tagged "barrier"
    (the grid barrier's poll) are the barrier's cost, counted apart."""
    pending = {}  # scoreboard -> epochs of the global loads it holds
    epoch = 0
    trips = [0, 0]
    for rep in (0, 1):
        for instr in body:
            waited = [sb for sb in pending if instr.wait >> sb & 1]
            if waited:
                if any(e == epoch for sb in waited for e in pending[sb]):
                    trips[rep] += 1
                    epoch += 1
                for sb in waited:
                    del pending[sb]
            if _is_global_load(instr) and instr.wr_sb != 7 and _tag_of(instr, tags) != "barrier":
                pending.setdefault(instr.wr_sb, []).append(epoch)
    return trips[1]


def _counts(body, tags) -> dict:
    count, mma, bytes_, ldg_ops, tagged = {"total": 0}, {}, {"shared_read": 0, "shared_written": 0,
                                                              "global_loaded": 0, "global_stored": 0}, {}, {}
    macs = 0
    for instr in body:
        kind = classify(instr.opcode)
        count[kind] = count.get(kind, 0) + 1
        count["total"] += 1
        if instr.opcode.split(".")[0] in ("FFMA", "DFMA"):  # a dot without tensor cores runs on these
            count["ffma"] = count.get("ffma", 0) + 1
        tag = _tag_of(instr, tags)
        if tag:
            tagged.setdefault(tag, {}).setdefault(kind, 0)
            tagged[tag][kind] += 1
        if kind == "mma":
            mma[instr.opcode] = mma.get(instr.opcode, 0) + 1
            m, n, k, elem = mma_shape(instr.opcode)
            if instr.opcode.startswith("HGMMA"):
                macs += m * n * k / 4
                # wgmma reads B, and A unless it is in registers, from shared memory (per warpgroup)
                a_in_smem = instr.operands.split(",")[1].strip().startswith("gdesc")
                bytes_["shared_read"] += ((m * k * elem if a_in_smem else 0) + n * k * elem) / 4 / 32
            else:
                macs += m * n * k
        elif kind in ("ldsm", "lds"):
            bytes_["shared_read"] += access_bytes(instr.opcode)
        elif kind == "sts":
            bytes_["shared_written"] += access_bytes(instr.opcode)
        elif kind == "ldg":
            bytes_["global_loaded"] += access_bytes(instr.opcode)
            ldg_ops[instr.opcode] = ldg_ops.get(instr.opcode, 0) + 1
        elif kind == "stg":
            bytes_["global_stored"] += access_bytes(instr.opcode)
        elif kind == "local":
            bytes_["local"] = bytes_.get("local", 0) + access_bytes(instr.opcode)
    # shared/global bytes are per thread so far: per warp
    bytes_ = {k: v * 32 for k, v in bytes_.items()}
    return {"count": count, "mma": mma, "macs": macs, "bytes": bytes_, "ldg_qualifiers": ldg_ops,
            "tags": tagged, "round_trips": _round_trips(body, tags),
            "serial": {f"local_{where}": [serial_cycles(body, SERIAL_LATENCY, local, 0),
                                          serial_cycles(body, SERIAL_LATENCY, local, 1)]
                       for where, local in LOCAL_LATENCY.items()}}


#: The serial chain: the cycles one warp needs to issue one iteration alone on its SM sub-partition (no
#: other warp to hide its latencies), from each instruction's control bits: the stall count the compiler
#: wrote (fixed-latency dependencies) and its scoreboard waits, each costed with the latency (lo, hi)
#: of the producer's unit. Sources: shared memory load 28.6 cycles ([R1] of static_cost: H100 SXM5
#: micro-benchmarks); "MIO" producers (MUFU, SHFL, conversions: Nsight Compute's "short scoreboard"
#: stall reason) 8 cycles (one warp instruction on a sub-partition's 4-lane-per-clock SFU, [R5]) to the
#: shared-memory latency; global loads 0 here (the model's round trips cost them); local memory (spilled
#: registers, cached like global memory: CUDA C++ Programming Guide, "Device Memory Accesses") an L1 hit,
#: 40.2 cycles, or an L2 hit, 259.9 ([R1]), by whether the spills fit in the L1 beside shared memory.
#: (Correction 3 of the calibration against FlashRNN, reports/static/calibration.md.)
SERIAL_LATENCY = {"shared": (29, 29), "mio": (8, 29), "global": (0, 0), "other": (0, 0)}
LOCAL_LATENCY = {"l1": 40, "l2": 260}
_MIO = ("MUFU", "SHFL", "F2F", "I2F", "F2I", "F2FP", "POPC", "FLO", "BREV", "MATCH", "REDUX", "S2R", "CS2R")


def unit(opcode: str) -> str:
    """The unit whose latency a scoreboard wait on this producer costs (see SERIAL_LATENCY)."""
    base = opcode.split(".")[0]
    if base in ("LDS", "LDSM"):
        return "shared"
    if base == "LDL":
        return "local"
    if base in ("LDG", "LD", "ATOMG", "LDGSTS"):
        return "global"
    return "mio" if base in _MIO else "other"


def serial_cycles(body, latency, local: int, end: int) -> float:
    """One warp's issue time of one iteration of ``body`` (the second of two, so that values carried
    from the previous iteration are waited for where they are), with ``latency[unit][end]``."""
    t, ready, ends = 0.0, {}, []
    for _ in (0, 1):
        for instr in body:
            issue = max([t] + [ready.get(sb, 0.0) for sb in range(6) if instr.wait >> sb & 1])
            u = unit(instr.opcode)
            if instr.wr_sb != 7:
                ready[instr.wr_sb] = max(ready.get(instr.wr_sb, 0.0), issue + (local if u == "local" else latency[u][end]))
            if instr.rd_sb != 7:
                ready[instr.rd_sb] = max(ready.get(instr.rd_sb, 0.0), issue)
            t = issue + max(1, instr.stall)
        ends.append(t)
    return ends[1] - ends[0]


def _release(instrs, loop: Loop) -> Optional[dict]:
    """Global stores of one iteration before and after its grid-barrier release (MEMBAR.*.GPU)."""
    span = [i for i in instrs if loop.start <= i.addr <= loop.end]
    fences = [k for k, i in enumerate(span) if i.opcode.startswith("MEMBAR") and "GPU" in i.opcode]
    if not fences:
        return None
    at = fences[-1]
    before = [i for i in span[:at] if classify(i.opcode) == "stg"]
    after = [i for i in span[at:] if classify(i.opcode) == "stg"]
    return {"stores_before": len(before), "bytes_before": 32 * sum(access_bytes(i.opcode) for i in before),
            "stores_after": len(after), "bytes_after": 32 * sum(access_bytes(i.opcode) for i in after)}


def analyze(cubin: bytes, tags=None) -> dict:
    """Loops and per-iteration counts of a cubin (see the module docstring)."""
    tags = tags or {}
    instrs, labels = parse(disassemble(cubin))
    loops = find_loops(instrs, labels)
    out = []
    for loop in loops:
        inner = [loops[c] for c in loop.children]
        body = [i for i in instrs if loop.start <= i.addr <= loop.end
                and not any(c.start <= i.addr <= c.end for c in inner)]
        entry = {"start": loop.start, "end": loop.end, "parent": loop.parent, "children": loop.children}
        entry.update(_counts(body, tags))
        entry["release"] = _release(instrs, loop)
        out.append(entry)
    return {"loops": out, "instructions": len(instrs)}
