"""Per-variable optimizer state ("slots"), keyed to the variable it belongs to.

Lion keeps one slot per trainable variable, its momentum `"m"`, plus the EMA
copy `"average"` when `use_ema=True`, and with gradient accumulation the
gradient sum `"accumulator"` and (lazy sparse mode) the row mask `"touched"`.
Slots live in a `SlotStore` that the optimizer keeps out of its ordinary
object-graph children. Checkpoints reach
each slot through the slot-variable protocol instead (`get_slot_names`,
`get_slot`, `_create_or_restore_slot_variable` on the optimizer), which saves
it under `<variable path>/.OPTIMIZER_SLOT/<optimizer path>/<slot name>`: keyed
to the variable, never to a list position. This is the layout of the classic
OptimizerV2, so such checkpoints are interchangeable.

Restoring works in either order: a slot restored before it exists (before the
optimizer's first step, or before a lazily built layer creates its variables)
is queued here and filled in the moment the slot is created.
"""

import contextlib
import warnings

import numpy as np
import tensorflow as tf
from tensorflow.python.distribute import sharded_variable

__all__ = ["SlotStore", "check_slot_shape", "slot_shape", "ROW_SLOTS", "match_keras_state",
           "describe", "kind", "PartialKerasState"]

# Slots with one entry per row of their variable (not the variable's shape).
ROW_SLOTS = ("touched",)


def slot_shape(variable, slot_name):
    """The shape of a slot: the variable's, or one entry per row for a row mask."""
    if slot_name in ROW_SLOTS:
        return tf.TensorShape(variable.shape[:1])
    return variable.shape


def check_slot_shape(variable, slot_name, saved_shape):
    """Raises ValueError naming `variable` when a saved slot does not fit it."""
    saved_shape = tf.TensorShape(saved_shape)
    expected = slot_shape(variable, slot_name)
    if not saved_shape.is_compatible_with(expected):
        raise ValueError(
            f"Checkpointed optimizer slot '{slot_name}' of variable "
            f"'{variable.name}' has shape {saved_shape.as_list()}, but the "
            f"variable has shape {variable.shape.as_list()} (the slot should have shape "
            f"{expected.as_list()}). The checkpoint does not fit this model; nothing was "
            "restored into this slot."
        )


@contextlib.contextmanager
def _variable_strategy_scope(variable):
    """The strategy `variable` belongs to, entered if we are outside any scope.

    A slot must be the same kind of variable as its variable (mirrored for a
    mirrored one, and so on), even when the optimizer is built outside
    `strategy.scope()`.
    """
    owner = getattr(variable, "_distribute_strategy", None)
    if owner is not None and not tf.distribute.has_strategy():
        with owner.scope():
            yield owner
        return
    current = tf.distribute.get_strategy()
    if owner is not None and owner is not current:
        raise ValueError(
            f"Variable '{variable.name}' was created under {type(owner).__name__}, but the "
            f"optimizer is creating its slots under {type(current).__name__}. Create the "
            "model and the optimizer, and apply gradients, under the same strategy."
        )
    yield current


class SlotStore:
    """Slot variables by (variable key, slot name), in creation order.

    `key_fn` maps a variable to a hashable key that is the same for every
    replica/component of a distributed variable.
    """

    def __init__(self, key_fn):
        self._key_fn = key_fn
        self._slots = {}  # key -> {slot name: tf.Variable}
        self._owners = {}  # key -> the variable the slots belong to
        self._order = []  # keys in the order their variables were first built
        # Keys of slots a checkpoint restore created before any build of their
        # variable: saved with it by tf.train.Checkpoint, but in no position
        # of `ordered` (Keras files) until a build adopts them, in its order.
        self._unordered = set()
        self._deferred = {}  # (key, slot name) -> [CheckpointPosition]
        self._followed = None  # ids of the variables `follow_order` last followed
        self.last_restored_from = None  # see `create`

    def get(self, variable, slot_name):
        return self._slots.get(self._key_fn(variable), {}).get(slot_name)

    def has(self, variable, slot_name):
        return self.get(variable, slot_name) is not None

    def ordered(self, slot_name):
        """All slots of one name, in the order their variables were built."""
        return [self._slots[k][slot_name] for k in self._order if slot_name in self._slots[k]]

    def follow_order(self, variables):
        """Orders the slots as `variables` when those are all the slots' variables.

        `model.fit` builds with `model.trainable_variables`, and so does
        `load_model` before it loads a Keras file by position: after a
        fine-tuning run that unfroze layers, the slots follow the model's
        order again, not the order the layers were first trained in. A list
        that leaves out some variables (a step over a subset) changes nothing.
        """
        if len(variables) < len(self._order):
            return
        ids = [id(v) for v in variables]
        if ids == self._followed:  # the same list as the last step's: nothing to do
            return
        self._followed = ids
        keys = list(dict.fromkeys(self._key_fn(v) for v in variables))
        built = set(self._order)
        order = [k for k in keys if k in built]
        if len(order) == len(self._order) and order != self._order:
            self._order = order

    def ordered_owners(self, slot_name):
        """The variables of `ordered(slot_name)`, in the same order."""
        return [self._owners[k] for k in self._order if slot_name in self._slots[k]]

    def owners(self):
        """Every variable with slots, built or only restored."""
        return list(self._owners.values())

    def built(self):
        """Whether any variable's slots were built (are in `ordered`)."""
        return bool(self._order)

    def adopt(self, variable):
        """`variable` is being built: its slots made by a restore take their place."""
        key = self._key_fn(variable)
        if key in self._unordered:
            self._unordered.discard(key)
            self._order.append(key)

    def create(self, variable, slot_name, dtype, initial_value=None, ordered=True):
        """Creates the slot next to `variable` (same strategy, same device).

        `ordered=False` (a checkpoint restore) leaves the variable's slots out
        of `ordered` until `adopt` (which `build` calls before it creates any).

        Returns `(slot, restored_without_state)`: the second is True when the
        variable was restored from a checkpoint that held no such slot for it
        (so the slot starts from its initial value, not from the checkpoint).
        """
        key = self._key_fn(variable)
        if initial_value is None:
            initial_value = tf.zeros(slot_shape(variable, slot_name), dtype=dtype)
        else:
            initial_value = tf.cast(initial_value, dtype)
        with _variable_strategy_scope(variable) as strategy:
            with strategy.extended.colocate_vars_with(variable):
                slot = tf.Variable(
                    initial_value,
                    name=f"{slot_name}/{variable._shared_name}",
                    dtype=dtype,
                    trainable=False,
                )
        # Queued checkpoint values first, and the slot is registered only if
        # they all fit: when one fails (e.g. a bfloat16 momentum restored into
        # a float32 slot), the error propagates and the values stay queued, so
        # the next attempt raises again instead of starting from zeros.
        positions = self._deferred.get((key, slot_name), [])
        # Highest restore UID first: later restores win, as in OptimizerV2.
        by_uid = sorted(positions, key=lambda p: p.restore_uid, reverse=True)
        for position in by_uid:
            position.restore(slot)
        self._deferred.pop((key, slot_name), None)
        # The position that won, for the caller to inspect at once and clear
        # (a position holds its whole checkpoint's object graph).
        self.last_restored_from = by_uid[0] if by_uid else None
        if key not in self._slots:
            self._slots[key] = {}
            self._owners[key] = variable
            if ordered:
                self._order.append(key)
            else:
                self._unordered.add(key)
        self._slots[key][slot_name] = slot
        restored_without_state = not positions and getattr(variable, "_self_update_uid", -1) >= 0
        return slot, restored_without_state

    def create_or_restore(self, position, slot_name, variable):
        """Restores `position` into the slot, or queues it until it exists."""
        check_slot_shape(variable, slot_name, position.value_shape())
        slot = self.get(variable, slot_name)
        if slot is None:
            self._deferred.setdefault((self._key_fn(variable), slot_name), []).append(position)
            return None
        position.restore(slot)
        return slot


def warn_slots_not_in_checkpoint(root, owners, key_fn, optimizer_name):
    """Warns when a checkpoint rooted at `root` cannot save some slots.

    Slots are saved only through their variables: a variable that is not in
    the same checkpoint (e.g. `tf.train.Checkpoint(optimizer=opt)` without the
    model) loses its slots from that checkpoint.
    """
    reachable = set()
    for obj in tf.train.TrackableView(root).descendants():
        if isinstance(obj, tf.Variable):
            reachable.add(key_fn(obj))
        elif isinstance(obj, sharded_variable.ShardedVariable):  # saved with its shards' slots
            reachable.update(key_fn(shard) for shard in obj.variables)
    missing = [v.name for v in owners if key_fn(v) not in reachable]
    if missing:
        warnings.warn(
            f"Optimizer '{optimizer_name}': the slots (momentum) of {len(missing)} "
            f"variable(s) are NOT saved in this checkpoint because the variables "
            f"themselves are not in it: {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
            "Slots are keyed to their variables; put the model in the same "
            "tf.train.Checkpoint as the optimizer, e.g. "
            "tf.train.Checkpoint(model=model, optimizer=optimizer).",
            stacklevel=2,
        )
        return missing
    return []


# --------------------------------------------------------------------------- #
# Keras file formats (`.keras`, `.weights.h5`): state stored by position
# --------------------------------------------------------------------------- #
_KINDS = {"m": "momenta", "average": "EMA averages", "accumulator": "gradient accumulators",
          "touched": "row masks", "iterations": "step counter",
          "skipped_steps": "skipped-step counter"}


def kind(label):
    return label.split(":", 1)[0]


def _owners(labels):
    """The variable names of slot labels (`"m:<name>"`)."""
    return {label.split(":", 1)[1] for label in labels if ":" in label}


def describe(labels):
    counts = {}
    for label in labels:
        counts[kind(label)] = counts.get(kind(label), 0) + 1
    return ", ".join(f"{_KINDS.get(name, name)}: {n}" for name, n in counts.items())


class PartialKerasState(ValueError):
    """A Keras file whose slots are for a subset of the optimizer's variable names."""


def match_keras_state(optimizer_name, labels, variables, saved_labels, saved_values):
    """Pairs the optimizer's variables with the values of a Keras file; checks all first.

    Keras files store optimizer state by list position. tf_lion also stores a
    label per position (`"m:<variable name>"`, `"iterations"`, ...).

    * By name, when the labels are unique on both sides, every label of the
      file is one of this optimizer's, and both hold slots for the same
      variable names (or the file none: an optimizer that never stepped):
      each value goes to the variable of its name, whatever the order the
      slots were built in (a fine-tuning run that unfroze layers builds them
      in another order than `load_model`). Slots the file has no value for
      keep theirs (`fresh`): EMA newly turned on, say. Names are generated
      per process (`dense_1`), so a file for other names is never matched by
      name, and a file with slots for a subset of the names (steps that left
      a frozen layer out, or shifted names?) raises `PartialKerasState`.
    * Otherwise by position (other variable names, or a file without labels):
      the kinds of state (with labels) and the counts must agree; a file
      with accumulators does not load into EMA averages.

    Every shape is checked before anything is assigned.

    Returns:
      `([(variable, value)], fresh)`: what to assign, and the labels of this
      optimizer's variables the file holds no value for.

    Raises:
      PartialKerasState: the file holds slots for a subset of the names.
      ValueError: the kinds, the count or a shape do not fit, naming them.
    """
    if saved_labels is None and len(saved_values) == 1:
        saved_labels = ["iterations"]  # an optimizer that never built its slots
    if saved_labels is not None and len(saved_labels) != len(saved_values):
        raise ValueError(f"Optimizer '{optimizer_name}': the Keras file has {len(saved_values)} "
                         f"values but {len(saved_labels)} labels; it looks damaged.")
    fresh = []
    saved_owners = _owners(saved_labels or [])
    if (saved_labels is not None and len(set(saved_labels)) == len(saved_labels)
            and set(saved_labels) <= set(labels)
            and (not saved_owners  # no slots: the step counters only
                 or (len(set(labels)) == len(labels) and saved_owners == _owners(labels)))):
        position = {label: i for i, label in enumerate(saved_labels)}
        matched = [(label, variable, position[label])
                   for label, variable in zip(labels, variables) if label in position]
        fresh = [label for label in labels if label not in position]
    elif (saved_labels is not None and len(set(saved_labels)) == len(saved_labels)
          and saved_owners and saved_owners < _owners(labels)):
        missing = sorted(_owners(labels) - saved_owners)
        raise PartialKerasState(
            f"Optimizer '{optimizer_name}': the Keras file holds slots for "
            f"{len(saved_owners)} of the {len(_owners(labels))} variable names this "
            f"optimizer has slots for (none for {missing[:3]}{' ...' if len(missing) > 3 else ''}"
            "): saved by steps that left those variables out, or by a model whose variable names "
            "are shifted (names are generated per process). Which is which cannot be told, so "
            "the slot values are NOT loaded (the step counters are); to keep them, save and "
            "restore with tf.train.Checkpoint, which keys slots to the variables themselves.")
    else:
        if (saved_labels is not None
                and sorted(map(kind, saved_labels)) != sorted(map(kind, labels))):
            raise ValueError(
                f"Optimizer '{optimizer_name}': the Keras file holds {describe(saved_labels)}; "
                f"this optimizer has {describe(labels)}. Load it into an optimizer with the "
                "same use_ema, gradient accumulation, sparse_mode and skip_nonfinite settings, "
                "and the same trainable variables. Nothing was loaded into the optimizer.")
        if len(saved_values) != len(variables):
            raise ValueError(
                f"Optimizer '{optimizer_name}' has {len(variables)} variables "
                f"({describe(labels)}); the Keras file holds {len(saved_values)}. Nothing was "
                "loaded into the optimizer.")
        matched = [(label, variable, i) for i, (label, variable) in enumerate(zip(labels,
                                                                                  variables))]
    pairs = []
    for label, variable, i in matched:
        saved = f" ('{saved_labels[i]}')" if saved_labels is not None else ""
        if tuple(variable.shape) != tuple(np.shape(saved_values[i])):
            raise ValueError(
                f"Optimizer '{optimizer_name}': '{label}' has shape {tuple(variable.shape)}, but "
                f"its value in the Keras file (position {i}{saved}) has shape "
                f"{tuple(np.shape(saved_values[i]))}. Nothing was loaded into the optimizer.")
        pairs.append((variable, keras_value(
            saved_values[i], variable.dtype,
            f"Optimizer '{optimizer_name}': '{label}' (position {i}{saved} in the Keras file)")))
    return pairs, fresh


def keras_value(value, dtype, what):
    """`value` of a Keras file as a tensor of `dtype`, or `ValueError` naming `what`.

    h5py has no bfloat16: it stores bfloat16 arrays as opaque 2-byte records
    (tf-keras's legacy `.h5` files, and Keras files of tf_lion before
    `file_value`), read here as the bfloat16 they are.
    """
    value = _decoded(value)
    try:
        return tf.cast(tf.constant(value), dtype)
    except (TypeError, ValueError, tf.errors.OpError) as error:
        raise ValueError(f"{what} holds a value of dtype {value.dtype} that cannot be "
                         f"converted to {tf.as_dtype(dtype).name} ({error}). Nothing was "
                         "loaded into the optimizer.") from None


def file_value(value):
    """A value to store in a Keras file: bfloat16 widened to float32 (exact),
    which h5py stores and every loader converts back."""
    value = _decoded(value)
    return value.astype(np.float32) if value.dtype == tf.bfloat16.as_numpy_dtype else value


def _decoded(value):
    value = np.asarray(value)
    if value.dtype.kind == "V" and value.dtype.itemsize == 2:
        value = value.view(tf.bfloat16.as_numpy_dtype)
    return value
