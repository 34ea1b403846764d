"""Built-in catalogue entries, one module per family; importing this package registers them."""
from . import exact, linear, structured  # noqa: F401
from . import gla  # noqa: F401
from . import based  # noqa: F401
from . import agent  # noqa: F401
from . import aaren  # noqa: F401
from . import titans  # noqa: F401
from . import inline  # noqa: F401
from . import rala  # noqa: F401
from . import rat  # noqa: F401
