import os

# Tests run on the CPU; the sharding tests start their own process with 8 fake devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
