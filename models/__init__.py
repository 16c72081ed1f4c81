"""Freshet's models: their math, and what every kind shares (never pyflink)."""
import os
import sys

# XLA's classic CPU runtime (one compiled function per program) rather than its thunk runtime (one per kernel): as
# fast here (ML-1M, the sequence model alone: 86.6 s against 87.5 s of learning, the same HR@10), but the thunk
# runtime maps ~380 memory regions per compiled program and never unmaps them (its compile cache keeps them), so a
# process that compiles a few hundred programs (a `freshet tune` grid, the test suite) reached the kernel's limit of
# 65,530 maps and crashed inside XLA. The cost: ~1.4 s more compiling at start-up (the sequence model: 4.7 s against
# 3.3 s). Set before TensorFlow starts, or not at all: XLA reads the flag in more than one place, and a change after
# it started makes its compiled programs call functions the runtime does not have. A flag in XLA_FLAGS wins.
if "tensorflow" not in sys.modules and "xla_cpu_use_thunk_runtime" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_thunk_runtime=false".strip()
