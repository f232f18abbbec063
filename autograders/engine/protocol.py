"""Messages between the grader and the sandboxed runner: length-prefixed frames over pipes.

A frame is ``>I`` total length, ``>I`` header length, a JSON header, then binary blobs whose sizes the
header lists (``"sizes"``). Arrays travel as ``.npy`` bytes (never pickle). The reader bounds every
frame and the whole stream before it allocates anything: whatever the sandbox sends is hostile data.
"""

from __future__ import annotations

import json
import os
import struct

MAX_FRAME = 64 << 20
MAX_HEADER = 1 << 20


class ProtocolError(Exception):
    """The other side sent something that is not a well-formed frame within the limits."""


def write_frame(fd: int, header: dict, blobs: list[bytes] = ()) -> None:
    blobs = list(blobs)
    head = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    body = struct.pack(">I", len(head)) + head + b"".join(blobs)
    data = struct.pack(">I", len(body)) + body
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class FrameReader:
    """Reads frames from a file descriptor, refusing any frame or stream larger than allowed."""

    def __init__(self, fd: int, max_frame: int = MAX_FRAME, max_total: int = 4 * MAX_FRAME):
        self.fd = fd
        self.max_frame = max_frame
        self.left = max_total

    def read(self) -> tuple[dict, list[bytes]]:
        """The next frame; raises EOFError at the end of the stream, ProtocolError on garbage."""
        (size,) = struct.unpack(">I", _read_exact(self.fd, 4))
        if size < 4 or size > self.max_frame or size > self.left:
            raise ProtocolError(f"a message of {size} bytes is over the limit")
        self.left -= size
        body = _read_exact(self.fd, size)
        (hsize,) = struct.unpack(">I", body[:4])
        if hsize > min(MAX_HEADER, size - 4):
            raise ProtocolError("a message header is over the limit")
        try:
            header = json.loads(body[4:4 + hsize])
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"a message header is not JSON ({exc})") from None
        sizes = header.get("sizes") if isinstance(header, dict) else None
        if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes) \
                or sum(sizes) != size - 4 - hsize:
            raise ProtocolError("a message's blobs do not match its header")
        blobs, at = [], 4 + hsize
        for s in sizes:
            blobs.append(body[at:at + s])
            at += s
        return header, blobs


# ---------------------------------------------------------------------------------------------
# Plain values (the arguments and results of given functions): tensors, numbers, None, tuples


def encode_value(value, blobs: list[bytes]):
    import numpy as np
    import torch

    from autograders.engine.core import encode_array

    if value is None or isinstance(value, (bool, int, float, str)):
        return {"v": value}
    if isinstance(value, torch.Tensor):
        with torch._C.DisableTorchFunctionSubclass():
            arr = value.detach().cpu()
            dtype = str(arr.dtype).removeprefix("torch.")
            if arr.dtype in (torch.bfloat16, torch.float16):
                arr = arr.float()
            blobs.append(encode_array(arr.numpy()))
        return {"tensor": len(blobs) - 1, "dtype": dtype}
    if isinstance(value, np.ndarray) and type(value) is np.ndarray:
        blobs.append(encode_array(value))
        return {"array": len(blobs) - 1}
    if isinstance(value, (tuple, list)):
        return {"seq": [encode_value(v, blobs) for v in value], "tuple": isinstance(value, tuple)}
    raise TypeError(f"a given function can only pass tensors, numbers, None and tuples, not {type(value).__name__}")


def decode_value(tree, blobs: list[bytes], depth: int = 0, max_elements: int = 1 << 24):
    import torch

    from autograders.engine.core import Blob, decode_array

    if depth > 16 or not isinstance(tree, dict):
        raise ProtocolError("malformed value")
    if "v" in tree:
        v = tree["v"]
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise ProtocolError("malformed value")
        return v
    if "tensor" in tree or "array" in tree:
        i = tree.get("tensor", tree.get("array"))
        if not isinstance(i, int) or not 0 <= i < len(blobs):
            raise ProtocolError("malformed value")
        arr = decode_array(Blob(blobs[i]))
        if arr.size > max_elements:
            raise ProtocolError("an array is larger than allowed")
        if "array" in tree:
            return arr
        t = torch.from_numpy(arr)
        dtype = getattr(torch, str(tree.get("dtype", "")), None)
        return t.to(dtype) if isinstance(dtype, torch.dtype) else t
    if "seq" in tree and isinstance(tree["seq"], list) and len(tree["seq"]) <= 1024:
        items = [decode_value(v, blobs, depth + 1, max_elements) for v in tree["seq"]]
        return tuple(items) if tree.get("tuple") else items
    raise ProtocolError("malformed value")
