"""The only pickle moemesh reads: protocol 2, interpreted opcode by opcode, admitting a
written list of globals and nothing that allocates from an argument.

Two pickles live in a checkpoint: DCP's ``.metadata`` (its dataclasses, torch sizes,
dtypes and layouts, plain containers) and, inside every shard entry, the ``data.pkl`` of a
``torch.save`` of one tensor (a storage reference and its shape). Python's ``pickle`` and
torch's weights-only unpickler both admit more than these need: torch's admits
``bytearray``, ``set`` and ``collections.Counter``, so a 40-byte file allocates and fills
any number of bytes before anyone looks at what it built; the C unpickler grows its memo
to twice any index a ``LONG_BINPUT`` names. This interpreter is plain Python over an
in-memory ``bytes`` whose size the caller capped before reading:

* opcodes: protocol 2's, only those that DCP's and ``torch.save``'s pickles use; none
  reads past the end of the data, a length or index is never used to allocate, the memo
  is a dict. Anything else is refused, naming the opcode and its offset.
* globals: ``METADATA_GLOBALS`` or ``TENSOR_GLOBALS`` below, each with how it may be used:
  a value (a dtype), a class that is instantiated empty (NEWOBJ with no arguments) and
  given its fields by BUILD, or a call whose arguments are checked here first (``torch.Size``
  of at most 64 ints, an enum or a layout by name, an empty ``OrderedDict``, a tensor's
  shape around a storage reference). None of them allocates more than its arguments.
* dict keys are str, int or DCP's ``MetadataIndex`` of str and ints, so hashing never
  recurses into what the file built; nothing the file built is ever printed.
* ``max_bytes`` bounds what the objects it makes take (each counted at about its size as
  it is made; a budget the caller derives from the model's expected metadata), and the
  stack and the nesting of MARKs are bounded by what pickle writes for DCP's metadata.

What it returns is checked against the expected schema by the caller (checkpoint_trust).
"""

from __future__ import annotations

import dataclasses
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

PROTOCOL = 2  # what moemesh writes (checkpoint_trust.Writer) and torch.save writes by default
MAX_DIMS = 64  # torch's own limit on a tensor's dimensions
_MAX_GLOBAL_NAME = 256
# pickle writes APPENDS and SETITEMS in batches of 1,000 items (2,000 stack slots for a dict's):
# DCP's metadata never has more on the stack, nor marks nested deeper than its dataclasses.
_MAX_STACK = 4096
_MAX_MARKS = 64


class Refused(ValueError):
    """The pickle uses something this interpreter does not admit; one line, no value of it."""


@dataclass(frozen=True)
class StorageRef:
    """``torch.save``'s persistent id of a storage: the record ``data/<key>`` of ``numel`` x dtype."""

    dtype: torch.dtype
    key: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """What ``_rebuild_tensor_v2`` would build: a strided view of a storage record."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


# --- the admitted globals -------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """A global pushed as it is (a dtype, a storage type)."""

    obj: Any


@dataclass(frozen=True)
class Class:
    """A class instantiated empty by NEWOBJ and given its fields by BUILD."""

    cls: type


@dataclass(frozen=True)
class Call:
    """A global that REDUCE may call: ``check(args)`` builds the result from checked arguments."""

    check: Callable[[tuple], Any]


def _is_int(v) -> bool:
    return type(v) is int


def _size(args: tuple) -> torch.Size:
    if len(args) != 1 or type(args[0]) not in (tuple, list):
        raise Refused("torch.Size takes one tuple of ints")
    (dims,) = args
    if len(dims) > MAX_DIMS or not all(_is_int(d) and 0 <= d < 2**63 for d in dims):
        raise Refused(f"torch.Size takes at most {MAX_DIMS} ints in [0, 2**63)")
    return torch.Size(dims)


def _mem_format(args: tuple) -> _MEM_FORMAT_ENCODING:
    if len(args) != 1 or not _is_int(args[0]):
        raise Refused("_MEM_FORMAT_ENCODING takes one int")
    try:
        return _MEM_FORMAT_ENCODING(args[0])
    except ValueError:
        raise Refused("_MEM_FORMAT_ENCODING: no such member") from None


_LAYOUTS = {"torch.strided": torch.strided}


def _layout(args: tuple) -> torch.layout:
    if len(args) != 1 or type(args[0]) is not str or args[0] not in _LAYOUTS:
        raise Refused(f"_get_layout takes one of {', '.join(_LAYOUTS)}")
    return _LAYOUTS[args[0]]


def _ordered_dict(args: tuple) -> OrderedDict:
    if args:
        raise Refused("OrderedDict is admitted empty only")
    return OrderedDict()


def _rebuild_tensor(args: tuple) -> TensorRef:
    if len(args) not in (6, 7):
        raise Refused("_rebuild_tensor_v2 takes 6 or 7 arguments")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    if not isinstance(storage, StorageRef):
        raise Refused("_rebuild_tensor_v2: the first argument is not a storage reference")
    for name, dims in (("size", size), ("stride", stride)):
        if type(dims) is not tuple or len(dims) > MAX_DIMS or not all(_is_int(d) and 0 <= d < 2**63 for d in dims):
            raise Refused(f"_rebuild_tensor_v2: its {name} is not a tuple of at most {MAX_DIMS} ints >= 0")
    if len(size) != len(stride) or not _is_int(offset) or not 0 <= offset < 2**63:
        raise Refused("_rebuild_tensor_v2: size, stride and offset disagree")
    if type(requires_grad) is not bool or type(hooks) is not OrderedDict or hooks:
        raise Refused("_rebuild_tensor_v2: requires_grad must be a bool and the hooks empty")
    if len(args) == 7 and args[6] is not None:
        raise Refused("_rebuild_tensor_v2: tensor metadata is not admitted")
    return TensorRef(storage, offset, size, stride)


_MD = "torch.distributed.checkpoint.metadata"
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# DCP's metadata: its dataclasses, the torch values they hold. A test holds this to a written list.
METADATA_GLOBALS: dict[str, Value | Class | Call] = {
    f"{_MD}.Metadata": Class(Metadata),
    f"{_MD}.TensorStorageMetadata": Class(TensorStorageMetadata),
    f"{_MD}.ChunkStorageMetadata": Class(ChunkStorageMetadata),
    f"{_MD}.TensorProperties": Class(TensorProperties),
    f"{_MD}.MetadataIndex": Class(MetadataIndex),
    f"{_MD}.StorageMeta": Class(StorageMeta),
    "torch.distributed.checkpoint.filesystem._StorageInfo": Class(_StorageInfo),
    f"{_MD}._MEM_FORMAT_ENCODING": Call(_mem_format),
    "torch.Size": Call(_size),
    "torch.serialization._get_layout": Call(_layout),
    **{f"torch.{name}": Value(dtype) for name, dtype in _DTYPES.items()},
}


@dataclass(frozen=True)
class StorageType:
    """A ``torch.<X>Storage`` global of a tensor's persistent id: the dtype of its elements."""

    dtype: torch.dtype


# The storage types torch.save names in a tensor's persistent id, and the dtype of each.
_STORAGES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# One tensor of a shard (torch.save's data.pkl): a storage reference and its shape.
TENSOR_GLOBALS: dict[str, Value | Class | Call] = {
    "torch._utils._rebuild_tensor_v2": Call(_rebuild_tensor),
    "collections.OrderedDict": Call(_ordered_dict),
    **{f"torch.{name}": Value(StorageType(dtype)) for name, dtype in _STORAGES.items()},
}


def storage_ref(pid) -> StorageRef:
    """``torch.save``'s persistent id ``('storage', torch.<X>Storage, key, location, numel)``."""
    if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
        raise Refused("a persistent id that is not a storage reference")
    _, kind, key, location, numel = pid
    if not isinstance(kind, StorageType):
        raise Refused("a storage reference without a storage type")
    if type(key) is not str or not (0 < len(key) <= 32 and key.isascii() and key.isalnum()):
        raise Refused("a storage key that is not a short name")
    if type(location) is not str or len(location) > 32 or not _is_int(numel) or not 0 <= numel < 2**63:
        raise Refused("a storage reference with a bad location or element count")
    return StorageRef(kind.dtype, key, numel)


# --- the interpreter ------------------------------------------------------------------


@dataclass(frozen=True)
class _Global:
    name: str
    entry: Class | Call


_OPNAMES = {ord(op.code): op.name for op in __import__("pickletools").opcodes}


def _key_ok(key) -> bool:
    """A dict key whose hash cannot recurse into what the file built."""
    if type(key) in (str, int):
        return True
    if type(key) is not MetadataIndex:
        return False
    offset, index = getattr(key, "offset", None), getattr(key, "index", None)
    return (
        type(getattr(key, "fqn", None)) is str
        and (offset is None or type(offset) is torch.Size)
        and (index is None or _is_int(index))
    )


def _fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


_ENCODED_FORMATS = {
    _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT: torch.contiguous_format,
    _MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST: torch.channels_last,
    _MEM_FORMAT_ENCODING.TORCH_PRESERVE_FORMAT: torch.preserve_format,
}


def _build_tensor_properties(inst: TensorProperties, state) -> None:
    """TensorProperties pickles as (dtype, layout, requires_grad, memory-format code, pin_memory)."""
    if type(state) is not tuple or len(state) != 5:
        raise Refused("TensorProperties' state is not its 5-tuple")
    dtype, layout, requires_grad, code, pin_memory = state
    if type(dtype) is not torch.dtype or type(layout) is not torch.layout:
        raise Refused("TensorProperties without a dtype and a layout")
    if type(requires_grad) is not bool or type(pin_memory) is not bool or type(code) is not _MEM_FORMAT_ENCODING:
        raise Refused("TensorProperties with ill-typed flags")
    for name, value in (
        ("dtype", dtype),
        ("layout", layout),
        ("requires_grad", requires_grad),
        ("memory_format", _ENCODED_FORMATS[code]),
        ("pin_memory", pin_memory),
    ):
        object.__setattr__(inst, name, value)


class _Machine:
    def __init__(self, data: bytes, admitted, max_bytes: int, persistent_load):
        self.data, self.pos = data, 0
        self.admitted, self.max_bytes, self.built = admitted, max_bytes, 0
        self.persistent_load = persistent_load
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.classes = {e.cls for e in admitted.values() if isinstance(e, Class)}

    # reading
    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise Refused(f"truncated: {n} bytes wanted at byte {self.pos} of {len(self.data)}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + _MAX_GLOBAL_NAME + 1)
        if end < 0:
            raise Refused(f"a GLOBAL name at byte {self.pos} is not a short line")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        if not raw.isascii():
            raise Refused("a GLOBAL name that is not ASCII")
        return raw.decode("ascii")

    # the stack; ``cost``: about the bytes the new object takes (ints and floats 32, strings
    # 64 + length, containers 64 + their slots, an instance and its attribute dict 256)
    def push(self, obj, cost: int = 32) -> None:
        self.built += cost
        if self.built > self.max_bytes:
            self.grow(0)  # raises
        if len(self.stack) >= _MAX_STACK:
            raise Refused(f"more than {_MAX_STACK} objects on the stack at byte {self.pos - 1}")
        self.stack.append(obj)

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise Refused(f"stack underflow at byte {self.pos - 1}")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise Refused(f"no MARK for the opcode at byte {self.pos - 1}")
        k = self.marks.pop()
        items = self.stack[k:]
        del self.stack[k:]
        return items

    def top(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise Refused(f"stack underflow at byte {self.pos - 1}")
        return self.stack[-1]

    def grow(self, n: int) -> None:
        self.built += n
        if self.built > self.max_bytes:
            raise Refused(
                f"it builds more than {self.max_bytes:,} bytes of objects, more than the expected metadata takes"
            )

    # opcodes that build something
    def set_items(self, pairs: list) -> None:
        d = self.top()
        if type(d) is not dict or len(pairs) % 2:
            raise Refused(f"SETITEM(S) on something that is not a dict at byte {self.pos - 1}")
        self.grow(64 * (len(pairs) // 2))
        for i in range(0, len(pairs), 2):
            if not _key_ok(pairs[i]):
                raise Refused(f"a dict key that is not a str, an int or a MetadataIndex at byte {self.pos - 1}")
            d[pairs[i]] = pairs[i + 1]

    def append(self, items: list) -> None:
        lst = self.top()
        if type(lst) is not list:
            raise Refused(f"APPEND(S) on something that is not a list at byte {self.pos - 1}")
        self.grow(8 * len(items))
        lst.extend(items)

    def global_(self) -> None:
        module, name = self.line(), self.line()
        key = f"{module}.{name}"
        entry = self.admitted.get(key)
        if entry is None:
            raise Refused(f"GLOBAL {key} is not admitted")
        self.push(entry.obj if isinstance(entry, Value) else _Global(key, entry))

    def reduce(self) -> None:
        args, fn = self.pop(), self.pop()
        if not (isinstance(fn, _Global) and isinstance(fn.entry, Call)) or type(args) is not tuple:
            raise Refused(f"REDUCE of something that is not an admitted call at byte {self.pos - 1}")
        self.push(fn.entry.check(args), cost=64 + 8 * len(args))

    def newobj(self) -> None:
        args, cls = self.pop(), self.pop()
        if not (isinstance(cls, _Global) and isinstance(cls.entry, Class)) or args != ():
            raise Refused(f"NEWOBJ of other than an admitted class without arguments at byte {self.pos - 1}")
        self.push(object.__new__(cls.entry.cls), cost=256)

    def build(self) -> None:
        state = self.pop()
        inst = self.top()
        cls = type(inst)
        if cls not in self.classes:
            raise Refused(f"BUILD of something that is not an admitted class at byte {self.pos - 1}")
        if cls is TensorProperties:
            _build_tensor_properties(inst, state)
            return
        if type(state) is not dict or not set(state) <= _fields(cls):
            raise Refused(f"BUILD of a {cls.__name__} with a state that is not a dict of its fields")
        for name, value in state.items():
            object.__setattr__(inst, name, value)

    # one method per admitted opcode (dispatched by ``run``), each reading its own argument
    def _u8(self) -> int:
        return self.take(1)[0]

    def _u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def op_mark(self) -> None:
        if len(self.marks) >= _MAX_MARKS:
            raise Refused(f"MARKs nested more than {_MAX_MARKS} deep at byte {self.pos - 1}")
        self.marks.append(len(self.stack))

    def op_binint1(self) -> None:
        self.push(self._u8())

    def op_binint2(self) -> None:
        self.push(struct.unpack("<H", self.take(2))[0])

    def op_binint(self) -> None:
        self.push(struct.unpack("<i", self.take(4))[0])

    def op_long1(self) -> None:
        n = self._u8()
        if n > 8:
            raise Refused(f"LONG1 of {n} bytes at byte {self.pos - 2}: at most 8")
        self.push(int.from_bytes(self.take(n), "little", signed=True))

    def op_binfloat(self) -> None:
        self.push(struct.unpack(">d", self.take(8))[0])

    def op_binunicode(self) -> None:
        at, n = self.pos - 1, self._u32()
        try:
            self.push(self.take(n).decode("utf-8", "surrogatepass"), cost=64 + n)
        except UnicodeDecodeError:
            raise Refused(f"BINUNICODE at byte {at} is not UTF-8") from None

    def op_tuple(self) -> None:
        items = self.pop_mark()
        self.push(tuple(items), cost=48 + 8 * len(items))

    def op_tuple1(self) -> None:
        self.push((self.pop(),), cost=56)

    def op_tuple2(self) -> None:
        b, a = self.pop(), self.pop()
        self.push((a, b), cost=64)

    def op_tuple3(self) -> None:
        c, b, a = self.pop(), self.pop(), self.pop()
        self.push((a, b, c), cost=72)

    def op_setitem(self) -> None:
        value = self.pop()
        self.set_items([self.pop(), value])

    def op_get(self, idx: int) -> None:
        if idx not in self.memo:
            raise Refused(f"memo {idx} read at byte {self.pos - 1} before it was written")
        self.push(self.memo[idx], cost=8)

    def op_put(self, idx: int) -> None:
        self.grow(64)
        self.memo[idx] = self.top()

    def op_binpersid(self) -> None:
        if self.persistent_load is None:
            raise Refused(f"opcode BINPERSID at byte {self.pos - 1} is not admitted")
        self.push(self.persistent_load(self.pop()))

    def run(self):
        if self.data[:2] != b"\x80" + bytes([PROTOCOL]):
            proto = self.data[1] if self.data[:1] == b"\x80" and len(self.data) > 1 else "0 or 1"
            raise Refused(f"pickle protocol {proto}; moemesh writes and reads protocol {PROTOCOL}")
        ops = {
            0x28: self.op_mark,  # MARK
            0x4E: lambda: self.push(None, cost=8),  # NONE
            0x88: lambda: self.push(True, cost=8),  # NEWTRUE
            0x89: lambda: self.push(False, cost=8),  # NEWFALSE
            0x4B: self.op_binint1,  # BININT1
            0x4D: self.op_binint2,  # BININT2
            0x4A: self.op_binint,  # BININT
            0x8A: self.op_long1,  # LONG1
            0x47: self.op_binfloat,  # BINFLOAT
            0x58: self.op_binunicode,  # BINUNICODE
            0x29: lambda: self.push((), cost=8),  # EMPTY_TUPLE
            0x74: self.op_tuple,  # TUPLE
            0x85: self.op_tuple1,  # TUPLE1
            0x86: self.op_tuple2,  # TUPLE2
            0x87: self.op_tuple3,  # TUPLE3
            0x5D: lambda: self.push([], cost=64),  # EMPTY_LIST
            0x61: lambda: self.append([self.pop()]),  # APPEND
            0x65: lambda: self.append(self.pop_mark()),  # APPENDS
            0x7D: lambda: self.push({}, cost=64),  # EMPTY_DICT
            0x73: self.op_setitem,  # SETITEM
            0x75: lambda: self.set_items(self.pop_mark()),  # SETITEMS
            0x68: lambda: self.op_get(self._u8()),  # BINGET
            0x6A: lambda: self.op_get(self._u32()),  # LONG_BINGET
            0x71: lambda: self.op_put(self._u8()),  # BINPUT
            0x72: lambda: self.op_put(self._u32()),  # LONG_BINPUT
            0x63: self.global_,  # GLOBAL
            0x52: self.reduce,  # REDUCE
            0x81: self.newobj,  # NEWOBJ
            0x62: self.build,  # BUILD
            0x30: self.pop,  # POP
            0x31: self.pop_mark,  # POP_MARK
            0x51: self.op_binpersid,  # BINPERSID
        }
        data, end = self.data, len(self.data)
        self.pos = 2
        while self.pos < end:
            code = data[self.pos]
            self.pos += 1
            if code == 0x2E:  # STOP
                if len(self.stack) != 1 or self.marks or self.pos != end:
                    raise Refused(f"STOP at byte {self.pos - 1} does not end one object")
                return self.stack[0]
            op = ops.get(code)
            if op is None:
                name = _OPNAMES.get(code, "unknown")
                raise Refused(f"opcode {name} (0x{code:02x}) at byte {self.pos - 1} is not admitted")
            op()
        raise Refused(f"truncated at byte {self.pos}: no STOP")


def loads(
    data: bytes,
    admitted: dict[str, Value | Class | Call],
    *,
    max_bytes: int,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """The object a protocol-2 pickle builds from ``admitted`` globals only, in objects of
    about ``max_bytes`` at most (counted as they are made); Refused (one line) otherwise."""
    try:
        return _Machine(bytes(data), admitted, max_bytes, persistent_load).run()
    except struct.error as err:  # cannot happen after take(); kept as one line anyway
        raise Refused(str(err)) from None
