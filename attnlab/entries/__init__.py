"""Built-in catalogue entries, one module per family; importing this package registers them."""
from . import exact, structured  # noqa: F401
