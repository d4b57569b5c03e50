"""Migrating Lion checkpoints written by other TensorFlow Lions into tf_lion.

Two layouts of Lion state appear in TensorFlow checkpoints.

**tf-keras Lion** (`tf_keras.optimizers.Lion`, the "new" tf-keras optimizer)
stores its state by list position. Saved with
`tf.train.Checkpoint(model=model, optimizer=opt)`, the keys are

    optimizer/_iterations                      the step counter (int64)
    optimizer/_learning_rate                   the learning rate, if a float
    optimizer/_variables/<i>                   every optimizer variable

and the object graph adds named edges to the same nodes:
`optimizer/momentums/<j>` is the momentum of the j-th variable given to
`build()` (for a custom loop or `fit`: `model.trainable_variables` at the
first step), and with `use_ema=True` `_model_variables_moving_average/<j>` is
its EMA copy. The EMA copies come first in `_variables` and shift the
momenta's indices, so this module follows the `momentums/<j>` edges, never
`_variables/<i>`. Nothing in the file says which model variable a momentum
belongs to: only the order does. `restore_from_tf_keras_lion` maps momentum j
onto `trainable_variables[j]` and checks every shape.

The same layout is written by tf-keras's SGD with momentum (also a
`momentums` list); the checkpoint cannot tell them apart, so make sure the
source was a Lion.

**OptimizerV2 slots** (the legacy `tf_keras.optimizers.legacy.Optimizer`, the
Lion published with the paper's TF2 code, and tf_lion itself) store each
momentum as a slot of its variable:

    <variable path>/.OPTIMIZER_SLOT/<optimizer path>/m
    optimizer/iter                             the legacy step counter

Such a checkpoint needs no conversion: `tf.train.Checkpoint(model=model,
optimizer=tf_lion.Lion(...)).restore(path)` restores the momenta through the
slot-variable protocol, keyed to the variables. `restore_from_tf_keras_lion`
recognises it and says so.
"""

import dataclasses
import warnings
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tf_lion.optimizer import Lion

__all__ = [
    "SavedTensor",
    "TfKerasLionState",
    "checkpoint_prefix",
    "read_tf_keras_lion_state",
    "restore_from_tf_keras_lion",
    "convert_tf_keras_lion_checkpoint",
    "read_value",
]

_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_SLOT_MARKER = "/.OPTIMIZER_SLOT/"


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One saved variable: its checkpoint key, shape and dtype."""

    key: str
    shape: Tuple[int, ...]
    dtype: tf.DType


@dataclasses.dataclass(frozen=True)
class TfKerasLionState:
    """Where a tf-keras Lion checkpoint keeps its state.

    Attributes:
      prefix: the checkpoint prefix that was read.
      optimizer_path: the optimizer's path in the object graph ("optimizer").
      momenta: momentum j of the j-th variable the optimizer was built with.
      averages: the EMA copies in the same order, or None (no `use_ema`).
      iterations: the step counter, or None if absent.
      learning_rate: the saved learning rate variable, or None (e.g. a schedule).
    """

    prefix: str
    optimizer_path: str
    momenta: Tuple[SavedTensor, ...]
    averages: Optional[Tuple[SavedTensor, ...]]
    iterations: Optional[SavedTensor]
    learning_rate: Optional[SavedTensor]


def checkpoint_prefix(path):
    """The checkpoint prefix for `path` (a prefix, or a directory: its latest checkpoint)."""
    path = str(path)
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"No checkpoint found in directory '{path}'.")
        return latest
    if not tf.io.gfile.exists(path + ".index"):
        raise FileNotFoundError(
            f"No checkpoint at '{path}' (expected '{path}.index'). Pass a checkpoint "
            "prefix such as '.../ckpt-3' or a directory with a 'checkpoint' file."
        )
    return path


# --------------------------------------------------------------------------- #
# Reading the object graph
# --------------------------------------------------------------------------- #
class _Graph:
    """The checkpoint's object graph, with the path of every node."""

    def __init__(self, reader):
        if not reader.has_tensor(_OBJECT_GRAPH_KEY):
            raise ValueError(
                "The checkpoint has no object graph: it was not written by "
                "`tf.train.Checkpoint` (a TF1 name-based checkpoint cannot be converted)."
            )
        self.proto = trackable_object_graph_pb2.TrackableObjectGraph()
        self.proto.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
        self.nodes = self.proto.nodes
        self.paths = {0: ""}  # breadth first: the shortest path names a node, as in TF
        queue = [0]
        for node_id in queue:
            for child in self.nodes[node_id].children:
                if child.node_id not in self.paths:
                    parent = self.paths[node_id]
                    self.paths[child.node_id] = f"{parent}/{child.local_name}" if parent else child.local_name
                    queue.append(child.node_id)

    def child(self, node_id, name):
        for child in self.nodes[node_id].children:
            if child.local_name == name:
                return child.node_id
        return None

    def list_items(self, node_id):
        """Node ids of a saved list's elements `0, 1, ...`, in order."""
        items = {}
        for child in self.nodes[node_id].children:
            if child.local_name.isdigit():
                items[int(child.local_name)] = child.node_id
        if sorted(items) != list(range(len(items))):
            raise ValueError(
                f"The list '{self.paths[node_id]}' in the checkpoint has elements "
                f"{sorted(items)}, not 0..n-1; the checkpoint looks damaged."
            )
        return [items[i] for i in range(len(items))]

    def value_key(self, node_id):
        for attribute in self.nodes[node_id].attributes:
            if attribute.name == "VARIABLE_VALUE":
                return attribute.checkpoint_key
        raise ValueError(
            f"'{self.paths[node_id]}' in the checkpoint is not a plain variable (no "
            "VARIABLE_VALUE); sharded or distributed optimizer state is not supported."
        )

    def has_slot_variables(self):
        return any(node.slot_variables for node in self.nodes)


def _find_tf_keras_optimizer(graph):
    """Node id of the tf-keras optimizer that has `momentums`; None if there is none."""
    found = sorted({node_id for node_id in range(len(graph.nodes))
                    if graph.child(node_id, "momentums") is not None
                    and graph.child(node_id, "_variables") is not None})
    if len(found) > 1:
        top = [n for n in found if graph.paths.get(n) == "optimizer"]
        if len(top) != 1:
            paths = ", ".join(repr(graph.paths.get(n)) for n in found)
            raise ValueError(f"The checkpoint holds several tf-keras optimizers ({paths}); "
                             "convert one at a time with a checkpoint of one optimizer.")
        return top[0]
    return found[0] if found else None


def _no_momenta_error(graph, reader, prefix):
    """The clearest explanation of why `prefix` has no tf-keras Lion momenta."""
    if graph.has_slot_variables() or any(_SLOT_MARKER in key for key in
                                         reader.get_variable_to_shape_map()):
        return ValueError(
            f"'{prefix}' is already in the OptimizerV2 slot layout "
            "('<variable>/.OPTIMIZER_SLOT/<optimizer>/m': a legacy tf-keras optimizer, the "
            "paper's TF2 Lion, or tf_lion itself). It needs no conversion: restore it with "
            "`tf.train.Checkpoint(model=model, optimizer=tf_lion.Lion(...)).restore(path)`; the "
            "momenta are restored, keyed to their variables, when the optimizer builds its slots."
        )
    optimizers = [n for n in range(len(graph.nodes))
                  if graph.child(n, "_variables") is not None
                  and graph.child(n, "_iterations") is not None]
    if optimizers:
        path = graph.paths.get(optimizers[0])
        return ValueError(
            f"'{prefix}' has a tf-keras optimizer at '{path}' but no Lion momenta "
            f"('{path}/momentums'): it was saved before the optimizer's first step, or it is "
            "not a Lion (Adam, for example, saves '_momentums' and '_velocities')."
        )
    return ValueError(f"'{prefix}' has no tf-keras Lion optimizer state (no 'momentums' list "
                      "in its object graph).")


def read_tf_keras_lion_state(path):
    """Finds a tf-keras Lion's momenta, EMA averages and step in a checkpoint.

    Args:
      path: checkpoint prefix, or a directory (its latest checkpoint).

    Returns:
      A `TfKerasLionState` (keys, shapes, dtypes; no values are read).

    Raises:
      FileNotFoundError: no checkpoint at `path`.
      ValueError: no tf-keras Lion state, with the reason (including a
        checkpoint already in the OptimizerV2 slot layout).
    """
    prefix = checkpoint_prefix(path)
    reader = tf.train.load_checkpoint(prefix)
    graph = _Graph(reader)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()

    def saved(node_id):
        key = graph.value_key(node_id)
        return SavedTensor(key, tuple(shapes[key]), tf.as_dtype(dtypes[key]))

    optimizer = _find_tf_keras_optimizer(graph)
    if optimizer is None:
        raise _no_momenta_error(graph, reader, prefix)
    momenta = tuple(saved(n) for n in graph.list_items(graph.child(optimizer, "momentums")))
    if not momenta:
        raise _no_momenta_error(graph, reader, prefix)
    averages = graph.child(optimizer, "_model_variables_moving_average")
    if averages is not None:
        averages = tuple(saved(n) for n in graph.list_items(averages)) or None
    if averages is not None and len(averages) != len(momenta):
        raise ValueError(f"'{prefix}' has {len(momenta)} momenta but {len(averages)} EMA "
                         "averages; the checkpoint looks damaged.")
    step = graph.child(optimizer, "_iterations")
    if step is None:
        step = graph.child(optimizer, "iter")
    lr = graph.child(optimizer, "_learning_rate")
    lr = saved(lr) if lr is not None and graph.nodes[lr].attributes else None
    return TfKerasLionState(
        prefix=prefix,
        optimizer_path=graph.paths[optimizer],
        momenta=momenta,
        averages=averages,
        iterations=None if step is None else saved(step),
        learning_rate=lr,
    )


# --------------------------------------------------------------------------- #
# Restoring into tf_lion
# --------------------------------------------------------------------------- #
def _check_shapes(variables, saved, what):
    for j, (variable, tensor) in enumerate(zip(variables, saved)):
        if tuple(variable.shape) != tensor.shape:
            raise ValueError(
                f"The tf-keras Lion {what} {j} ('{tensor.key}') has shape "
                f"{list(tensor.shape)}, but the variable it maps to, trainable_variables[{j}] "
                f"'{variable.name}', has shape {variable.shape.as_list()}. Momentum j belongs to "
                "the j-th variable the source optimizer was built with; pass "
                "`trainable_variables` in that order. Nothing was restored."
            )


def restore_from_tf_keras_lion(path, model, optimizer, *, trainable_variables=None):
    """Restores a tf-keras Lion checkpoint into `model` and a `tf_lion.Lion`.

    The checkpoint must have been written by `tf.train.Checkpoint(model=model,
    optimizer=tf_keras.optimizers.Lion(...))`. Restores the model's weights
    (the checkpoint's `model` entry), then builds `optimizer`'s slots and
    assigns momentum j (cast to the slot's dtype) to the slot of
    `trainable_variables[j]`, the step counter, and the EMA averages when both
    the source and `optimizer` use EMA. Every count and shape is checked
    before anything changes; a model weight missing from the checkpoint can
    only be found by reading it, and then the weights read are put back
    before the error. The optimizer's hyperparameters (learning rate
    included) are the ones `optimizer` was created with.

    Args:
      path: checkpoint prefix, or a directory (its latest checkpoint).
      model: the model, built (its variables exist), as when it was saved.
      optimizer: a `tf_lion.Lion`.
      trainable_variables: the variables in the order the source optimizer was
        built with. Defaults to `model.trainable_variables`.

    Returns:
      The `TfKerasLionState` that was read.

    Raises:
      ValueError: no tf-keras Lion momenta in the checkpoint (or it is already
        in the OptimizerV2 slot layout), a count or shape mismatch (naming
        the variable), or the model's weights are not in the checkpoint.
    """
    if not isinstance(optimizer, Lion):
        raise TypeError(f"`optimizer` must be a tf_lion.Lion, got {type(optimizer).__name__}.")
    state = read_tf_keras_lion_state(path)
    variables = list(model.trainable_variables if trainable_variables is None
                     else trainable_variables)
    if len(state.momenta) != len(variables):
        raise ValueError(
            f"The checkpoint '{state.prefix}' has {len(state.momenta)} tf-keras Lion momenta but "
            f"{len(variables)} trainable variables were given. Momentum j belongs to the j-th "
            "variable the source optimizer was built with; pass exactly those, in that order, "
            "as `trainable_variables`."
        )
    _check_shapes(variables, state.momenta, "momentum")
    restore_averages = state.averages is not None and optimizer.use_ema
    if restore_averages:
        _check_shapes(variables, state.averages, "EMA average")

    reader = tf.train.load_checkpoint(state.prefix)
    if _Graph(reader).child(0, "model") is None:
        raise ValueError(f"'{state.prefix}' has no 'model' entry: write the source with "
                         "`tf.train.Checkpoint(model=model, optimizer=optimizer)`.")

    # Slots first: built before the weights are restored, they are not taken
    # for slots missing from a checkpoint. Every value is assigned below.
    optimizer.build(variables)
    _restore_model(state.prefix, model, optimizer)
    for variable, tensor in zip(variables, state.momenta):
        slot = optimizer.get_slot(variable, "m")
        slot.assign(tf.cast(reader.get_tensor(tensor.key), slot.dtype))
    if state.iterations is not None:
        step = reader.get_tensor(state.iterations.key)
        optimizer.iterations.assign(tf.cast(step, optimizer.iterations.dtype))
    if restore_averages:
        for variable, tensor in zip(variables, state.averages):
            average = optimizer.get_slot(variable, "average")
            average.assign(tf.cast(reader.get_tensor(tensor.key), average.dtype))
    elif optimizer.use_ema:  # as tf-keras does at build: averages start at the weights
        for variable in variables:
            average = optimizer.get_slot(variable, "average")
            average.assign(tf.cast(variable, average.dtype))
        warnings.warn(f"'{state.prefix}' has no EMA averages (written without use_ema); "
                      "the averages start from the restored weights.", stacklevel=2)
    elif state.averages is not None:
        warnings.warn(f"'{state.prefix}' has EMA averages (written with use_ema=True) but "
                      "the tf_lion optimizer has use_ema=False: the averages are dropped.",
                      stacklevel=2)
    return state


def _restore_model(prefix, model, optimizer):
    """Restores the checkpoint's 'model' entry into `model`; every weight must be in it.

    `read` (not `restore`) adds no save counter to match. Only the model's own
    weights must come from the checkpoint: a model compiled with `optimizer`
    reaches it (and its slots, built empty just before) as a child, and the
    optimizer's learning rate and step are kept as they were. While this runs,
    the optimizer lets the source's `momentums` list pass; the momenta are
    read by position afterwards.
    """
    weights = {id(v): v for v in model.variables}
    previous = {key: v.numpy() for key, v in weights.items()}  # put back if a weight is missing
    # The source's step and learning rate could reach these through the
    # model's optimizer; the slots are all assigned by the caller.
    own = [v for v in (optimizer.iterations, getattr(optimizer, "_learning_rate", None))
           if isinstance(v, tf.Variable)]
    own_values = [v.numpy() for v in own]
    before = {key: v._update_uid for key, v in weights.items()}  # pylint: disable=protected-access
    optimizer._migrating = True  # pylint: disable=protected-access
    try:
        tf.train.Checkpoint(model=model).read(prefix).expect_partial()
    finally:
        optimizer._migrating = False  # pylint: disable=protected-access
        for variable, value in zip(own, own_values):
            variable.assign(value)
    # A restore stamps every variable it assigns with its (increasing) uid.
    missing = [v.name for key, v in weights.items()
               if v._update_uid <= before[key]]  # pylint: disable=protected-access
    if missing:
        for key, variable in weights.items():
            variable.assign(previous[key])
        raise ValueError(
            f"The model does not match the checkpoint's 'model' entry in '{prefix}': "
            f"{len(missing)} of the model's {len(weights)} weights are not in it: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}.")


def convert_tf_keras_lion_checkpoint(src_path, dst_prefix, model, optimizer):
    """Rewrites a tf-keras Lion checkpoint in tf_lion's (OptimizerV2 slot) layout.

    Restores `src_path` with `restore_from_tf_keras_lion`, then writes
    `tf.train.Checkpoint(model=model, optimizer=optimizer)` to `dst_prefix`.
    The new checkpoint also holds `optimizer`'s learning rate variable (if
    its learning rate is a float), which a later restore assigns.

    Returns:
      The path written (`dst_prefix`).
    """
    restore_from_tf_keras_lion(src_path, model, optimizer)
    return tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(dst_prefix))


def read_value(prefix, tensor):
    """The value of a `SavedTensor` as a numpy array."""
    return np.asarray(tf.train.load_checkpoint(prefix).get_tensor(tensor.key))
