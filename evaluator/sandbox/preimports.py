"""What a sandbox worker imports before its candidate runs (standard library only here).

The worker imports these in its trusted prologue: once it runs as ``nobody``, the interpreter's
own directory may be unreadable (e.g. under /root), so everything a masker may import must be
loaded first. The fork server (``forkserver.py``, which imports this file as a plain module)
imports them once, so that its forked workers find them loaded; torch is the slow one.
"""

MODULES = (
    "collections", "functools", "heapq", "itertools", "math", "random", "typing", "dataclasses",
    "bisect", "copy", "operator", "statistics", "string", "re", "encodings.idna", "unicodedata",
    "numpy", "numpy.ctypeslib",  # safetensors needs numpy.ctypeslib lazily
    "torch", "safetensors.torch",
)
