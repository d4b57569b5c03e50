"""Shared test setup.

Logical CPU devices must be configured before TensorFlow initialises, so this
runs at import time (pytest imports conftest.py before any test module).
"""

import numpy as np
import pytest
import tensorflow as tf

NUM_LOGICAL_CPUS = 2

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
