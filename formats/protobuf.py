"""The few pieces of protobuf's wire format a SentencePiece model needs: fields written and read.
"""

import struct


def proto_field(number, value):
    """One protobuf field: bools and ints as varints, floats as fixed32, text length-delimited."""
    if isinstance(value, float):
        return proto_varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return proto_varint(number << 3) + proto_varint(int(value))
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return proto_varint(number << 3 | 2) + proto_varint(len(raw)) + raw


def proto_varint(n):
    n &= (1 << 64) - 1  # a negative int32 is ten bytes of two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def proto_fields(data):
    """(field number, value) of each field of a protobuf message: varints as ints, length-delimited
    fields as bytes, fixed-width ones as their bytes."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 2:
            n, pos = read_varint(data, pos)
            value, pos = data[pos:pos + n], pos + n
        else:
            n = {1: 8, 5: 4}[wire]
            value, pos = data[pos:pos + n], pos + n
        yield key >> 3, value


def read_varint(data, pos):
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
