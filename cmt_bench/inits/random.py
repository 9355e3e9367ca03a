"""From scratch: the freshly seeded network as it is."""
from . import Init, register

INIT = register(Init(name="random", label="random", color="#7f7f7f", upstream=(), start=lambda net, method: None))
