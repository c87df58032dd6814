"""A worked example of tuning a user's own Triton kernel: RMSNorm over the last dim.

``rmsnorm.py`` is the runtime (kernel + launcher that reads the lookup table), ``spec.py`` its
registration with the tuner, ``rmsnorm.yaml`` its search space.
"""
