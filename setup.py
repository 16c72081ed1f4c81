"""Freshet: a real-time recommender on PyFlink and TensorFlow.

The repository's folders are installed under one namespace, ``freshet.*`` (``jobs`` becomes
``freshet.jobs`` and so on), so nothing generic like ``models`` lands in site-packages.
"""
from setuptools import setup

FOLDERS = ["conf", "jobs", "udfs", "models", "ops", "scripts"]

setup(
    name="freshet",
    version="0.1.0",
    description="Real-time recommendations: Kafka -> PyFlink windows -> online TensorFlow model -> Kafka",
    python_requires=">=3.11,<3.13",
    packages=["freshet"] + [f"freshet.{f}" for f in FOLDERS],
    package_dir={"freshet": "freshet", **{f"freshet.{f}": f for f in FOLDERS}},
    package_data={"freshet.conf": ["*.yaml"]},
    install_requires=[
        # Versions verified to resolve together (see ../shared/ENVIRONMENT.md).
        "apache-flink==2.3.0",
        "tensorflow-cpu==2.20.0",
        "protobuf>=5.29,<6",
        "numpy==2.1.3",
        "pandas==2.2.3",
        "pyarrow==16.1.0",
        "confluent-kafka==2.16.1",
        "pyyaml>=6.0,<7",
        "psutil>=5.9,<8",                # CPU and RSS of the Flink processes (freshet bench)
    ],
    extras_require={
        "test": ["pytest==9.2.0", "hypothesis==6.170.15"],
        "eval": ["matplotlib>=3.8,<4"],
        "profile": ["py-spy>=0.4,<0.5"],
    },
    entry_points={"console_scripts": ["freshet=freshet.scripts.cli:main"]},
)
