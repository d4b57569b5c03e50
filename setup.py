"""tf_lion: the Lion optimizer for TensorFlow 2 / tf-keras."""

from setuptools import find_packages, setup

setup(
    name="tf_lion",
    version="0.1.0",
    description="Lion optimizer for TensorFlow 2 (tf-keras): XLA/TPU-ready dense and sparse updates",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tf_lion", "tf_lion.*"]),
    python_requires=">=3.10",
    # tf-keras must match TensorFlow's minor version; tested with 2.21.
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "numpy",
        "absl-py",
    ],
    extras_require={"test": ["pytest"]},
    license="Apache-2.0",
)
