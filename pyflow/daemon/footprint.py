"""pyflowd's footprint: import only the parts of pyroute2 the daemon uses.

pyroute2/__init__.py imports every API the library has (NDB with sqlite3, IPDB, IPVS,
nl80211, WireGuard, plan9, ...) whichever one is wanted: about 20 MB of an idle pyflowd's
41 MiB resident, of which the submodules pyflow uses (IPRoute, the netlink codec, the tc
plugins) are about 14 MB. The daemon package calls :func:`skip_pyroute2_init` before
anything imports pyroute2 (pyflow/daemon/__init__.py), so `import pyroute2.<submodule>`
loads that submodule alone; the first use of a top-level name (`from pyroute2 import NDB`
anywhere in the process) runs the package's __init__ then, so code that wants the whole
package sees no difference. Library users of pyflow who never import pyflow.daemon get
pyroute2 as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any


def skip_pyroute2_init() -> None:
    """Register pyroute2 as a package whose __init__ runs on first attribute use only.
    A no-op when pyroute2 is imported already (or not installed)."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)  # __path__, __spec__: enough for submodules

    def __getattr__(name: str) -> Any:
        # ``from pyroute2 import protocols`` (pyroute2 does it itself) asks for a submodule
        if not name.startswith("__") and importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")
        if name.startswith("__") and name not in ("__all__", "__version__"):
            raise AttributeError(name)  # probes (copy, pickle, inspect) need not run the package
        del module.__dict__["__getattr__"]
        assert spec.loader is not None
        spec.loader.exec_module(module)
        return getattr(module, name)

    module.__dict__["__getattr__"] = __getattr__
    sys.modules["pyroute2"] = module
