# The compiled XLA FFI handlers of bncore.jax (src/bncore/_jax_ffi.c): PyCapsules of the
# handlers' addresses, for jax.ffi.register_ffi_target, and the XLA FFI API version they
# were built against.
from typing_extensions import CapsuleType

norm_forward: CapsuleType
norm_backward: CapsuleType
ffi_api_version: tuple[int, int]
