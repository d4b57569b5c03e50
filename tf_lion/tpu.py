"""TPU readiness check: compile a train step with XLA and lint its HLO.

A TPU runs one XLA program per step. It has no float64 units, needs every
shape to be known when the program is compiled, and stalls whenever the
program waits on the host. None of that shows on CPU or GPU, where the same
step runs (slowly) anyway. `check_compiles` compiles a step with XLA on the
machine at hand, takes the HLO that XLA would hand to any backend and
reports what a TPU cannot run or runs badly:

* ``"not-compilable"``: ops without an XLA kernel (``tf.py_function``,
  ``tf.numpy_function``, ``tf.print``, string ops, ``tf.unique_with_counts``,
  ...). XLA stops at the first one; the report names every op of the traced
  graph that has no XLA kernel.
* ``"float64"``: instructions that compute or hold ``f64`` (or ``c128``)
  data. TPUs have no 64-bit floating point. ``f64`` *constants* are ignored:
  some TensorFlow lowerings emit a scalar ``f64`` constant that is converted
  straight away (``tf.image.resize`` does) and XLA folds the conversion.
* ``"dynamic-shape"``: bounded-dynamic (``f32[<=8]``) or unbounded (``?``)
  dimensions, produced by data-dependent shapes (``tf.unique``,
  ``tf.boolean_mask``, ``tf.where`` with one argument, ``tf.dynamic_partition``).
  A TPU pads them to their bound, and their lowerings are slow (``tf.unique``
  becomes sorts and a serial while loop).
* ``"host-transfer"``: ``send``/``recv``, ``infeed``/``outfeed`` and
  custom-calls into host code (Python callbacks, host-memory offloading):
  each one is a round trip to the host inside the step.
* ``"custom-call"``: a custom-call whose target is not one XLA itself
  expands on every backend; it may exist only on the platform that compiled
  it.

Lint the ``"hlo"`` stage (before backend passes): ``"optimized_hlo"`` on
CPU holds CPU-only custom-calls (oneDNN, Eigen) that a TPU never sees.

`collectives` lists the cross-replica communication (all-reduce,
all-gather, all-to-all, collective-permute, reduce-scatter) with operand
shapes and element counts, e.g. to show that a sparse embedding gradient is
gathered row-wise instead of being all-reduced as a table-sized tensor.

The check runs on CPU; it does not need (and cannot emulate) a TPU. Ops whose
XLA kernels live only in TPU builds (``CrossReplicaSum``, ``AllToAll``,
``CollectivePermute``, infeed/outfeed ops) are reported as not compilable
here, with a note saying so.
"""

import collections
import dataclasses
import inspect
import re
from typing import Dict, List, Tuple

import numpy as np
import tensorflow as tf

__all__ = [
    "KINDS",
    "Problem",
    "Collective",
    "HloInstruction",
    "HloReport",
    "TPUCompatibilityError",
    "parse_hlo",
    "lint_hlo",
    "collectives",
    "xla_function",
    "compile_report",
    "check_compiles",
]

NOT_COMPILABLE = "not-compilable"
FLOAT64 = "float64"
DYNAMIC_SHAPE = "dynamic-shape"
HOST_TRANSFER = "host-transfer"
CUSTOM_CALL = "custom-call"
KINDS = (NOT_COMPILABLE, FLOAT64, DYNAMIC_SHAPE, HOST_TRANSFER, CUSTOM_CALL)

# Custom-call targets that XLA itself defines and expands (or that TPUs
# implement natively), so they are portable. Measured at the "hlo" stage on
# CPU: "Eigh", "Qr" and "ProductOfElementaryHouseholderReflectors" from
# tf.linalg.eigh/qr/solve; "Sharding" and the "SPMD..." shape targets from
# XlaSharding and XlaSpmdFullToShardShape/XlaSpmdShardToFullShape. "TopK" and
# "ApproxTopK" are XLA's own top-k targets.
PORTABLE_CUSTOM_CALLS = frozenset({
    "Eigh",
    "Qr",
    "ProductOfElementaryHouseholderReflectors",
    "Sharding",
    "SPMDFullToShardShape",
    "SPMDShardToFullShape",
    "TopK",
    "ApproxTopK",
})
# Custom-calls that run host code or move data to host memory (any target
# with "callback" in its name is treated the same way).
HOST_CUSTOM_CALLS = frozenset({
    "xla_python_cpu_callback",
    "xla_python_gpu_callback",
    "xla_ffi_python_cpu_callback",
    "xla_ffi_python_gpu_callback",
    "MoveToHost",
    "MoveToDevice",
})
# Custom-calls of XLA's dynamic padder: reported as dynamic shapes.
DYNAMIC_CUSTOM_CALLS = frozenset({"SliceToDynamic", "PadToStatic"})

_SHAPE_ONLY_OPCODES = frozenset({"broadcast", "reshape", "bitcast", "copy", "transpose"})
# What XLA folds when every operand is a constant (a reduction's f64 init value
# is `convert(constant)`).
_FOLDED_OPCODES = _SHAPE_ONLY_OPCODES | {"convert"}
HOST_OPCODES = frozenset({"send", "recv", "infeed", "outfeed"})
COLLECTIVE_OPCODES = frozenset({
    "all-reduce", "all-reduce-start",
    "all-gather", "all-gather-start",
    "all-to-all", "ragged-all-to-all",
    "collective-permute", "collective-permute-start",
    "collective-broadcast",
    "reduce-scatter",
})

# TensorFlow ops whose XLA kernels are linked only into TPU builds
# (tensorflow/core/tpu/kernels/cross_replica_ops.cc and the infeed/outfeed
# kernels in tensorflow/core/tpu/kernels/xla/).
TPU_ONLY_OPS = frozenset({
    "CrossReplicaSum", "AllToAll", "CollectivePermute",
    "InfeedDequeue", "InfeedDequeueTuple", "OutfeedEnqueue", "OutfeedEnqueueTuple",
})
_FRIENDLY_OP_NAMES = {
    "EagerPyFunc": "tf.py_function",
    "PyFunc": "tf.numpy_function",
    "PyFuncStateless": "tf.numpy_function",
    "PrintV2": "tf.print",
    "StringFormat": "tf.print / tf.strings.format",
    "UniqueWithCounts": "tf.unique_with_counts",
}
# Graph ops the XLA compiler handles without a kernel of their own.
_NO_KERNEL_NEEDED = frozenset({"Placeholder", "_Arg", "_Retval", "NoOp"})

_LINE_WIDTH = 200
_MAX_LISTED = 25


# --------------------------------------------------------------------------- #
# Data classes
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing a TPU cannot run, or runs with a host round trip or padding.

    Attributes:
      kind: one of `KINDS`.
      detail: a sentence saying what was found and where it comes from.
      hlo_line: the offending HLO instruction without its metadata, shortened
        (empty for problems found before HLO exists).
    """

    kind: str
    detail: str
    hlo_line: str = ""

    def __str__(self):
        text = f"[{self.kind}] {self.detail}"
        if self.hlo_line:
            text += f"\n    HLO: {self.hlo_line}"
        return text


@dataclasses.dataclass(frozen=True)
class HloInstruction:
    """One parsed HLO instruction (metadata split off)."""

    name: str
    shape: str
    opcode: str
    operands: Tuple[Tuple[str, str], ...]  # (shape, name) per operand
    attributes: str
    computation: str
    op_type: str = ""  # TensorFlow op type from the metadata, if any
    op_name: str = ""  # TensorFlow op name from the metadata, if any
    text: str = ""  # the instruction without metadata

    @property
    def operand_shapes(self):
        return tuple(shape for shape, _ in self.operands)

    def origin(self):
        """`TF op Type 'name'` for messages, from the metadata."""
        if not self.op_type and not self.op_name:
            return ""
        return f"TF op {self.op_type or '?'} '{self.op_name or '?'}'"


@dataclasses.dataclass(frozen=True)
class Collective:
    """A cross-replica communication instruction.

    Attributes:
      opcode: `all-reduce`, `all-gather`, `all-to-all`, `collective-permute`,
        `reduce-scatter`, ... (async `-start` forms keep their suffix).
      name: the HLO instruction name.
      operand_shapes: the operands' HLO shapes, e.g. `("f32[50,8]{1,0}",)`.
      result_shape: the result's HLO shape.
      operand_elements: elements sent by one replica (sum over operands).
      result_elements: elements received by one replica.
      replica_groups: the `replica_groups` attribute text, if any.
      origin: TF op type and name from the metadata.
      hlo_line: the instruction, shortened.
    """

    opcode: str
    name: str
    operand_shapes: Tuple[str, ...]
    result_shape: str
    operand_elements: int
    result_elements: int
    replica_groups: str
    origin: str
    hlo_line: str

    @property
    def elements(self):
        """The larger of the elements sent and received per replica."""
        return max(self.operand_elements, self.result_elements)


@dataclasses.dataclass
class HloReport:
    """What `lint_hlo` / `check_compiles` found in one compiled step.

    Attributes:
      hlo_text: the HLO module text ("" if the step did not compile).
      problems: the `Problem`s found, in HLO order (compile failures first).
      instruction_count: HLO instructions in all computations.
      opcode_counts: instructions per HLO opcode.
      kind_counts: instructions per problem kind (e.g. every `f64`
        instruction, where `problems` lists only where f64 data starts).
      collectives: the cross-replica communication instructions.
    """

    hlo_text: str
    problems: List[Problem] = dataclasses.field(default_factory=list)
    instruction_count: int = 0
    opcode_counts: Dict[str, int] = dataclasses.field(default_factory=dict)
    kind_counts: Dict[str, int] = dataclasses.field(default_factory=dict)
    collectives: List[Collective] = dataclasses.field(default_factory=list)

    @property
    def ok(self):
        """True when no problem was found."""
        return not self.problems

    def problems_of(self, kind):
        """The problems of one kind."""
        if kind not in KINDS:
            raise ValueError(f"Unknown problem kind {kind!r}; kinds are {KINDS}.")
        return [p for p in self.problems if p.kind == kind]

    def format(self, title="XLA program"):
        """A readable multi-line summary, listing every problem."""
        if self.ok:
            return (f"{title}: ready for TPU ({self.instruction_count} HLO instructions, "
                    f"{len(self.collectives)} collective(s)).")
        counts = ", ".join(f"{k}: {v}" for k, v in self.kind_counts.items() if v)
        lines = [f"{title} is not ready for TPU: {len(self.problems)} problem(s) ({counts})."]
        for problem in self.problems[:_MAX_LISTED]:
            lines.append(" - " + str(problem).replace("\n", "\n  "))
        if len(self.problems) > _MAX_LISTED:
            lines.append(f" ... and {len(self.problems) - _MAX_LISTED} more.")
        return "\n".join(lines)

    def __str__(self):
        return self.format()


class TPUCompatibilityError(ValueError):
    """A step that a TPU cannot run as one static XLA program.

    Attributes:
      report: the `HloReport`, with the HLO text and every problem.
    """

    def __init__(self, report, title="XLA program"):
        super().__init__(report.format(title))
        self.report = report

    @property
    def problems(self):
        return self.report.problems


# --------------------------------------------------------------------------- #
# HLO text parsing
# --------------------------------------------------------------------------- #
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=(){}]+)\s*=\s*(?P<rest>.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_ARRAY_SHAPE = re.compile(r"\b(?P<type>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")
_WIDE_TYPES = ("f64", "c128")


def _matching(text, start, open_char, close_char):
    """Index just past the bracket closing the one at `start` (quotes respected)."""
    depth = 0
    quoted = False
    i = start
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == open_char:
            depth += 1
        elif c == close_char:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def _split_top_level(text, sep=","):
    """Splits at `sep` outside brackets and quotes."""
    parts, depth, quoted, current = [], 0, False, []
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\" and i + 1 < len(text):
                current.append(c)
                i += 1
                c = text[i]
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append("".join(current).strip())
            current = []
            i += 1
            continue
        current.append(c)
        i += 1
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def _strip_attribute(attributes, key):
    """Removes `key={...}` from an attribute string; returns (rest, removed body)."""
    match = re.search(r"(?:^|,\s*)" + re.escape(key) + r"=\{", attributes)
    if not match:
        return attributes, ""
    brace = match.end() - 1
    end = _matching(attributes, brace, "{", "}")
    body = attributes[brace + 1:end - 1]
    return attributes[:match.start()] + attributes[end:], body


def _metadata_field(metadata, field):
    match = re.search(field + r'="((?:[^"\\]|\\.)*)"', metadata)
    return match.group(1) if match else ""


def _parse_instruction(line, computation):
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    rest = match.group("rest").strip()
    if rest.startswith("("):
        end = _matching(rest, 0, "(", ")")
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    shape, rest = rest[:end].strip(), rest[end:].strip()
    opcode_match = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
    if not opcode_match:
        return None
    opcode = opcode_match.group(1)
    args_start = opcode_match.end() - 1
    args_end = _matching(rest, args_start, "(", ")")
    operand_text = rest[args_start + 1:args_end - 1]
    attributes = rest[args_end:].lstrip(", ").strip()
    attributes, metadata = _strip_attribute(attributes, "metadata")
    operands = []
    if opcode not in ("constant", "parameter", "iota"):
        for operand in _split_top_level(operand_text):
            pieces = operand.rsplit(None, 1)
            if len(pieces) == 2:
                operands.append((pieces[0], pieces[1].lstrip("%")))
            elif pieces:
                operands.append(("", pieces[0].lstrip("%")))
    prefix = line[:match.start("rest")].strip()
    text = f"{prefix} {shape} {opcode}({operand_text})"
    if attributes:
        text += ", " + attributes
    return HloInstruction(
        name=match.group("name").lstrip("%"),
        shape=shape,
        opcode=opcode,
        operands=tuple(operands),
        attributes=attributes,
        computation=computation,
        op_type=_metadata_field(metadata, "op_type"),
        op_name=_metadata_field(metadata, "op_name"),
        text=text.strip(),
    )


def parse_hlo(hlo_text):
    """The instructions of an HLO module's text, in order (all computations)."""
    instructions = []
    computation = ""
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("HloModule", "//", "}")):
            continue
        header = _COMPUTATION.match(line)
        if header and "=" not in stripped.split("(", 1)[0]:
            computation = header.group("name")
            continue
        instruction = _parse_instruction(line, computation)
        if instruction is not None:
            instructions.append(instruction)
    return instructions


def _shorten(text, width=_LINE_WIDTH):
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _array_shapes(shape):
    return [(m.group("type"), m.group("dims")) for m in _ARRAY_SHAPE.finditer(shape)]


def _has_wide_type(shape):
    return any(dtype in _WIDE_TYPES for dtype, _ in _array_shapes(shape))


def _dynamic_dims(shape):
    """The array shapes in `shape` that have a dynamic dimension."""
    return [f"{dtype}[{dims}]" for dtype, dims in _array_shapes(shape)
            if "<=" in dims or "?" in dims]


def _element_count(shape):
    """Elements in an HLO shape (tuples summed; `<=n` counts n, `?` counts 1)."""
    total = 0
    for dtype, dims in _array_shapes(shape):
        if dtype == "token":
            continue
        count = 1
        for dim in filter(None, (d.strip() for d in dims.split(","))):
            dim = dim.replace("<=", "")
            count *= int(dim) if dim.isdigit() else 1
        total += count
    return total


def _custom_call_target(instruction):
    match = re.search(r'custom_call_target="((?:[^"\\]|\\.)*)"', instruction.attributes)
    return match.group(1) if match else ""


def _with_origin(sentence, instruction):
    origin = instruction.origin()
    return f"{sentence} (from {origin})" if origin else sentence


def _replica_groups(attributes):
    """The text of a `replica_groups=...` attribute ("" if absent)."""
    match = re.search(r"(?:^|,\s*)replica_groups=", attributes)
    if not match:
        return ""
    start = match.end()
    if attributes[start:start + 1] == "{":
        return attributes[start:_matching(attributes, start, "{", "}")]
    return _split_top_level(attributes[start:])[0]  # iota form, e.g. [1,2]<=[2]


def collectives(hlo_text):
    """Cross-replica communication in an HLO module, in order.

    Args:
      hlo_text: HLO module text (e.g. from `experimental_get_compiler_ir`).

    Returns:
      A list of `Collective` (all-reduce, all-gather, all-to-all,
      collective-permute, reduce-scatter, ...; the `-done` halves of async
      pairs are left out) with operand shapes and element counts.
    """
    found = []
    for ins in parse_hlo(hlo_text):
        if ins.opcode not in COLLECTIVE_OPCODES:
            continue
        operand_shapes = ins.operand_shapes
        found.append(Collective(
            opcode=ins.opcode,
            name=ins.name,
            operand_shapes=operand_shapes,
            result_shape=ins.shape,
            operand_elements=sum(_element_count(s) for s in operand_shapes),
            result_elements=_element_count(ins.shape),
            replica_groups=_replica_groups(ins.attributes),
            origin=ins.origin(),
            hlo_line=_shorten(ins.text),
        ))
    return found


# --------------------------------------------------------------------------- #
# Linting
# --------------------------------------------------------------------------- #
def lint_hlo(hlo_text):
    """Lints HLO text for TPU trouble; a pure function of the text.

    Checks:
      * float64: instructions whose result holds `f64`/`c128` (constants,
        and broadcasts, reshapes or converts of constants, excepted: XLA
        folds them). One problem per place where 64-bit data starts (an f64
        instruction none of whose operands is one, parameters of called
        computations excepted); `kind_counts["float64"]` counts all of them.
      * dynamic-shape: results with `<=` (bounded) or `?` (unbounded)
        dimensions; one problem per place where dynamism starts, plus the
        dynamic padder's `SliceToDynamic`/`PadToStatic` custom-calls.
      * host-transfer: `send`, `recv`, `infeed`, `outfeed` instructions
        (`-done` halves are counted, not listed twice) and custom-calls into
        host code (`HOST_CUSTOM_CALLS`, or any target naming a callback).
      * custom-call: custom-call targets outside `PORTABLE_CUSTOM_CALLS`,
        which may exist only on the platform that produced the HLO.

    Args:
      hlo_text: an HLO module as text (`stage="hlo"`).

    Returns:
      An `HloReport`.
    """
    instructions = parse_hlo(hlo_text)
    opcodes = collections.Counter(ins.opcode for ins in instructions)
    kind_counts = collections.Counter({kind: 0 for kind in KINDS if kind != NOT_COMPILABLE})
    problems = []

    # Constants, and broadcasts/reshapes of constants, are folded by XLA.
    constant_like = set()
    for ins in instructions:
        if ins.opcode == "constant" or (
                ins.opcode in _FOLDED_OPCODES and ins.operands
                and all(name in constant_like for _, name in ins.operands)):
            constant_like.add(ins.name)
    wide = {ins.name for ins in instructions
            if ins.name not in constant_like and _has_wide_type(ins.shape)}
    # Parameters of called computations (reducers, loop bodies, branches) hold
    # what the caller passes them: the caller's operands are where it starts.
    entry = next((match.group("name") for match in map(_COMPUTATION.match, hlo_text.splitlines())
                  if match and match.group(0).lstrip().startswith("ENTRY")), None)

    def passed_in(ins):
        return ins.opcode == "parameter" and entry is not None and ins.computation != entry
    dynamic = {ins.name for ins in instructions if _dynamic_dims(ins.shape)}
    kind_counts[FLOAT64] = len(wide)
    kind_counts[DYNAMIC_SHAPE] = len(dynamic)

    for ins in instructions:
        line = _shorten(ins.text)
        operand_names = [name for _, name in ins.operands]
        if ins.name in wide and not any(n in wide for n in operand_names) and not passed_in(ins):
            types = sorted({d for d, _ in _array_shapes(ins.shape) if d in _WIDE_TYPES})
            problems.append(Problem(
                FLOAT64,
                _with_origin(f"{ins.opcode} produces {'/'.join(types)} data; TPUs have no "
                             "64-bit floating point", ins),
                line))
        if (ins.name in dynamic and not any(n in dynamic for n in operand_names)
                and not passed_in(ins)):
            problems.append(Problem(
                DYNAMIC_SHAPE,
                _with_origin(f"{ins.opcode} has a data-dependent shape "
                             f"{', '.join(_dynamic_dims(ins.shape))}; TPUs need static shapes", ins),
                line))
        if ins.opcode in HOST_OPCODES or ins.opcode in ("send-done", "recv-done"):
            kind_counts[HOST_TRANSFER] += 1
            if ins.opcode in HOST_OPCODES:
                host = "is_host_transfer=true" in ins.attributes
                what = {"send": "sends data", "recv": "receives data",
                        "infeed": "reads from the infeed queue",
                        "outfeed": "writes to the outfeed queue"}[ins.opcode]
                where = " to/from the host" if host or ins.opcode in ("infeed", "outfeed") else (
                    " over a channel outside this program")
                problems.append(Problem(
                    HOST_TRANSFER,
                    _with_origin(f"{ins.opcode} {what}{where}: a round trip inside the step", ins),
                    line))
        if ins.opcode == "custom-call":
            target = _custom_call_target(ins)
            if target in PORTABLE_CUSTOM_CALLS or target in DYNAMIC_CUSTOM_CALLS:
                continue  # the dynamic padder's shapes are reported above
            if target in HOST_CUSTOM_CALLS or "callback" in target.lower():
                kind_counts[HOST_TRANSFER] += 1
                problems.append(Problem(
                    HOST_TRANSFER,
                    _with_origin(f"custom-call '{target}' runs host code or moves data to host "
                                 "memory", ins),
                    line))
            else:
                kind_counts[CUSTOM_CALL] += 1
                problems.append(Problem(
                    CUSTOM_CALL,
                    _with_origin(f"custom-call '{target}' is not expanded by XLA on every "
                                 "backend; it may not exist on TPU", ins),
                    line))

    return HloReport(
        hlo_text=hlo_text,
        problems=problems,
        instruction_count=len(instructions),
        opcode_counts=dict(opcodes),
        kind_counts=dict(kind_counts),
        collectives=collectives(hlo_text),
    )


# --------------------------------------------------------------------------- #
# Compiling a step
# --------------------------------------------------------------------------- #
def _jit_compile_flag(fn):
    spec = getattr(fn, "function_spec", None)
    if spec is not None and hasattr(spec, "jit_compile"):
        return spec.jit_compile
    return getattr(fn, "_jit_compile", None)


def xla_function(step_fn):
    """`step_fn` as a `tf.function(jit_compile=True)`.

    A `tf.function` already compiled with `jit_compile=True` is returned as
    is (its traces are reused); another `tf.function` has its Python
    function re-wrapped (a new trace); a plain callable is wrapped.
    """
    if isinstance(step_fn, tf.types.experimental.PolymorphicFunction):
        if _jit_compile_flag(step_fn):
            return step_fn
        return tf.function(step_fn.python_function, jit_compile=True)
    if not callable(step_fn):
        raise TypeError(f"`step_fn` must be callable; received {step_fn!r}.")
    if not (inspect.isfunction(step_fn) or inspect.ismethod(step_fn)):
        # functools.partial and callable objects: TF 2.21's compiler-IR path
        # loses a partial's bound keyword arguments, so call through a function.
        callable_object = step_fn

        def step_fn(*args, **kwargs):
            return callable_object(*args, **kwargs)

    return tf.function(step_fn, jit_compile=True)


def _ops_in(concrete_fn):
    """{op type: [node names]} over the function and its nested functions."""
    graph_def = concrete_fn.graph.as_graph_def()
    functions = {f.signature.name for f in graph_def.library.function}
    found = collections.defaultdict(list)
    for node in graph_def.node:
        found[node.op].append(node.name)
    for function in graph_def.library.function:
        for node in function.node_def:
            found[node.op].append(f"{function.signature.name}/{node.name}")
    for name in functions:
        found.pop(name, None)
    return found


def _has_string_io(op_type):
    from tensorflow.core.framework import types_pb2
    from tensorflow.python.framework import op_def_registry

    op_def = op_def_registry.get(op_type)
    if op_def is None:
        return False
    return any(arg.type == types_pb2.DT_STRING
               for arg in list(op_def.input_arg) + list(op_def.output_arg))


def _ops_without_xla_kernel(concrete_fn, device_type):
    """{op type: [node names]} of the ops with no XLA kernel for `device_type`."""
    from tensorflow.python.framework import kernels

    missing = {}
    for op_type, nodes in _ops_in(concrete_fn).items():
        if op_type in _NO_KERNEL_NEEDED:
            continue
        devices = {k.device_type for k in kernels.get_registered_kernels_for_op(op_type).kernel}
        if device_type not in devices:
            missing[op_type] = nodes
    return missing


_UNSUPPORTED = re.compile(
    r"No registered '(?P<op>[^']+)' OpKernel for (?P<device>\S+) devices compatible with "
    r"node (?:\{\{function_node [^}]+\}\})?\{\{node (?P<node>[^}]+)\}\}")


def _describe_op(op_type):
    notes = []
    if op_type in _FRIENDLY_OP_NAMES:
        notes.append(_FRIENDLY_OP_NAMES[op_type])
    if _has_string_io(op_type):
        notes.append("a string op: XLA has no string type")
    if op_type in TPU_ONLY_OPS:
        notes.append("its XLA kernel exists only in TPU builds, so it cannot be checked here")
    return f"{op_type} ({'; '.join(notes)})" if notes else op_type


def _compile_failure(error, concrete_fn):
    """Problems for a step that XLA refused to compile."""
    message = str(error)
    match = _UNSUPPORTED.search(message)
    if match is None:
        first = next((line for line in message.splitlines() if line.strip()), message)
        first = first.replace("Failed getting HLO text: ", "").strip("'")
        return [Problem(NOT_COMPILABLE,
                        f"XLA could not compile the step: {_shorten(first, 400)}")]
    device = match.group("device")
    missing = {match.group("op"): [match.group("node")]}
    for op_type, nodes in _ops_without_xla_kernel(concrete_fn, device).items():
        missing.setdefault(op_type, nodes)
    problems = []
    for op_type, nodes in missing.items():
        shown = ", ".join(f"'{n}'" for n in nodes[:3]) + (" ..." if len(nodes) > 3 else "")
        problems.append(Problem(
            NOT_COMPILABLE,
            f"op {_describe_op(op_type)} has no XLA kernel ({device}); node(s) {shown}"))
    return problems


def _spec_inputs(fn, args, kwargs):
    """`(wrapper, specs)`: `fn` as a function of the call's tensors alone, as specs.

    A TPU compiles its program before it sees any input, so no input value may
    shape it. TensorFlow's compiler-IR call, given tensors, compiles their
    values in wherever the program needs a constant (a slice whose size is read
    from an input), and it takes `tf.TensorSpec`s only at the top level, not
    nested in a structure (a dataset's `element_spec`). So every tensor, NumPy
    array or spec of the call, at any depth, becomes a top-level spec argument
    of a wrapper that rebuilds the call; other values (Python numbers, objects,
    variables) stay as given, and defaults are bound explicitly. The step is
    compiled, never run.
    """
    try:
        signature = inspect.signature(fn.python_function)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):  # no Python signature: leave the call as given
        parameters = []
    else:
        bound.apply_defaults()
        args, kwargs = bound.args, bound.kwargs
        parameters = list(signature.parameters)
    structure = (args, kwargs)
    # Composite tensors (sparse, ragged) and their specs count by their components.
    leaves = tf.nest.flatten(structure, expand_composites=True)
    names = _leaf_names(parameters, args, kwargs)
    positions, specs = [], []
    for i, (leaf, name) in enumerate(zip(leaves, names)):
        if isinstance(leaf, tf.TensorSpec):
            specs.append(tf.TensorSpec(leaf.shape, leaf.dtype, name=leaf.name or name))
        elif isinstance(leaf, (tf.Tensor, np.ndarray)) and not isinstance(leaf, tf.Variable):
            specs.append(tf.TensorSpec(leaf.shape, tf.as_dtype(leaf.dtype), name=name))
        else:
            continue
        positions.append(i)

    def step_of_tensors(*tensors):
        filled = list(leaves)
        for i, tensor in zip(positions, tensors):
            filled[i] = tensor
        call_args, call_kwargs = tf.nest.pack_sequence_as(structure, filled,
                                                         expand_composites=True)
        return fn(*call_args, **call_kwargs)
    return tf.function(step_of_tensors, jit_compile=True, autograph=False), specs


def _leaf_names(parameters, args, kwargs):
    """A name for each leaf of `tf.nest.flatten((args, kwargs), expand_composites=True)`.

    The argument's parameter name (`x`, from `parameters`, the step's
    parameter names in order), with the leaf's place inside it (`batch_1`)
    for a structure: the checked program's inputs, and so its problems, name
    the step's own arguments.
    """
    names = []
    tops = [(parameters[i] if i < len(parameters) else f"arg{i}", arg)
            for i, arg in enumerate(args)]
    tops += [(key, kwargs[key]) for key in sorted(kwargs)]  # tf.nest's order of a dict
    for base, value in tops:
        count = len(tf.nest.flatten(value, expand_composites=True))
        names += [base] if count == 1 else [f"{base}_{j}" for j in range(count)]
    return names


def compile_report(step_fn, *args, **kwargs):
    """Compiles `step_fn(*args, **kwargs)` with XLA and lints it; never raises on problems.

    The step is traced and compiled, not run: variables keep their values.
    Shapes and dtypes are taken from the example arguments (tensors or
    `tf.TensorSpec`s, also nested, e.g. a dataset's `element_spec`), as a
    TPU would see them: never their values (`_spec_inputs`), so a shape that
    depends on an input's value is reported, not compiled in.

    Variables: Keras layers and optimizers create theirs in `tf.init_scope`
    on the first trace, which works (a fresh optimizer's slots are created,
    zero-initialised, by the check). A step that creates a `tf.Variable` in
    its own body on every trace fails here as it fails in `tf.function`;
    create it outside the step.

    Returns:
      An `HloReport`. If XLA could not compile the step, `hlo_text` is ""
      and the problems have kind "not-compilable": when XLA's error names an
      op without an XLA kernel, one problem per such op of the traced graph;
      otherwise one problem quoting the error's first line.
    """
    fn = xla_function(step_fn)
    # Tracing and argument errors propagate; only compiling is reported on.
    concrete_fn = fn.get_concrete_function(*args, **kwargs)
    unknown = [spec for spec in tf.nest.flatten((args, kwargs), expand_composites=True)
               if isinstance(spec, tf.TensorSpec) and not spec.shape.is_fully_defined()]
    if unknown:
        shapes = ", ".join(str(spec.shape) for spec in unknown)
        problem = Problem(DYNAMIC_SHAPE,
                          f"example input(s) of shape {shapes} have unknown dimensions; a TPU "
                          "program is compiled for static shapes: pass tensors or fully "
                          "defined tf.TensorSpecs")
        return HloReport(hlo_text="", problems=[problem],
                         kind_counts={kind: int(kind == DYNAMIC_SHAPE) for kind in KINDS})
    wrapper, specs = _spec_inputs(fn, args, kwargs)
    compiler_ir = wrapper.experimental_get_compiler_ir(*specs)
    try:
        hlo_text = compiler_ir(stage="hlo")
    except (ValueError, tf.errors.OpError) as error:
        problems = _compile_failure(error, concrete_fn)
        counts = collections.Counter(p.kind for p in problems)
        return HloReport(hlo_text="", problems=problems,
                         kind_counts={kind: counts[kind] for kind in KINDS})
    report = lint_hlo(hlo_text)
    report.kind_counts = {NOT_COMPILABLE: 0, **report.kind_counts}
    return report


def check_compiles(step_fn, *args, **kwargs):
    """Checks that a train step compiles to one static XLA program a TPU can run.

    Run it on your own step, on CPU, with example inputs of the shapes you
    will feed on TPU:

        report = tf_lion.tpu.check_compiles(train_step, x_batch, y_batch)

    `step_fn` is wrapped in `tf.function(jit_compile=True)` (a `tf.function`
    already compiled with XLA is used as is; one without `jit_compile` is
    re-wrapped). The step is compiled, never run. What is checked, and why
    (see the module docstring for details): every op has an XLA kernel (a TPU
    runs nothing else); no float64 (TPUs have none); no dynamic dimensions
    (TPUs need static shapes); no send/recv, infeed/outfeed or host callbacks
    inside the step (each is a host round trip); no custom-call a TPU may
    not have.

    Returns:
      The `HloReport` (HLO text, opcode counts, collectives) when the step
      is clean.

    Raises:
      TPUCompatibilityError: (a `ValueError`) listing each problem with the
        offending HLO line; its `.report` holds the full report.
    """
    report = compile_report(step_fn, *args, **kwargs)
    if not report.ok:
        name = getattr(step_fn, "__name__", None) or type(step_fn).__name__
        raise TPUCompatibilityError(report, title=f"Step '{name}'")
    return report
