"""The persistent CUDA expert kernel's host side: the weight tape must hold exactly the pieces the
kernel's blocks consume, in their order (expert_chain.cu's header). The kernel itself needs an
sm_90 GPU and nvcc (scripts/megakernel_ab.py checks it there against float32 math)."""

import pytest
import torch

from kvreuse.model.megakernel import N_ITEMS, N_QKV, D, F, H, W, pack_layer

SLOTS_QKV, SLOTS_REST = 4, 14


def _weights():
    g = torch.Generator().manual_seed(0)
    return (torch.randn((H + 2) * D, W, generator=g), torch.randn(W, H * D, generator=g),
            torch.randn(2 * F, W, generator=g), torch.randn(W, F, generator=g))


def _start(b: int) -> int:
    return min(b, N_QKV) * SLOTS_QKV + min(b, N_ITEMS) * SLOTS_REST


def test_tape_layout():
    qkv, o, gu, down = _weights()
    tape = pack_layer(qkv, o, gu, down, pad=8)
    assert tape.shape == (N_QKV * SLOTS_QKV + N_ITEMS * SLOTS_REST, 16, 520)
    assert not tape[..., 512:].any()  # padding
    k0, k1 = slice(0, 512), slice(512, 1024)
    # Block 5 = QKV item 5 (q head 0, dims 80..95 and their rotary partners 208..223), K in two halves.
    s = _start(5)
    assert torch.equal(tape[s, :, :512], qkv[80:96, k0])
    assert torch.equal(tape[s + 1, :, :512], qkv[208:224, k0])
    assert torch.equal(tape[s + 2, :, :512], qkv[80:96, k1])
    # Item 77 = head slot 9 (v), u = 5: rows 9 * 256 + 80.
    assert torch.equal(tape[_start(77) + 3, :, :512], qkv[9 * 256 + 208 : 9 * 256 + 224, k1])
    # Block 3 after its QKV: Wo item 3 (columns 96..127, inputs 0..511), then gate/up, then down.
    s = _start(3) + SLOTS_QKV
    assert torch.equal(tape[s, :, :512], o[96:112, k0])
    assert torch.equal(tape[s + 1, :, :512], o[112:128, k0])
    gate_up = [gu[96:112], gu[112:128], gu[F + 96 : F + 112], gu[F + 112 : F + 128]]
    for ks, kk in enumerate((k0, k1)):
        for gi, piece in enumerate(gate_up):
            assert torch.equal(tape[s + 2 + 4 * ks + gi, :, :512], piece[:, kk])
    for gi in range(4):  # down item 3: columns 192 + 16 gi, inputs 0..511
        assert torch.equal(tape[s + 10 + gi, :, :512], down[192 + 16 * gi : 208 + 16 * gi, k0])
    # Block 81 has no QKV item; Wo item 81 = columns 17 * 32.., inputs 1024..1535 (k-slice 2).
    s = _start(81)
    assert torch.equal(tape[s, :, :512], o[544:560, 1024:1536])
    # down item 81: column range 1 (64..127), k-slice 5.
    assert torch.equal(tape[s + 10, :, :512], down[64:80, 2560:3072])


def test_pack_rejects_other_shapes():
    qkv, o, gu, down = _weights()
    with pytest.raises(ValueError, match="gate_up weight is"):
        pack_layer(qkv, o, gu[:-16], down)


def test_core_tape_layout():
    """The WGMMA build's slots: per k-slice, all of the item's columns as [inputs / 8][16 G][8]."""
    qkv, o, gu, down = _weights()
    tape = pack_layer(qkv, o, gu, down, core=True).view(-1, 8192)
    # Block 3's gate/up item (G = 4, 2 k-slices): slot 1 of k-slice 0 holds inputs 128..255 of
    # columns gate 96..127 then up 96..127; core column c, row n = element [c][n][:] of the slot.
    s = _start(3) + SLOTS_QKV + 2 + 1
    cols = torch.cat([gu[96:128], gu[F + 96 : F + 128]])  # (64, 1024)
    want = cols[:, 128:256].reshape(64, 16, 8).transpose(0, 1)  # (16 core columns, 64 rows, 8)
    assert torch.equal(tape[s].view(16, 64, 8), want)
    # Block 5's QKV item (G = 2), k-slice 1, slot 0: inputs 512..767 of dims 80..95 and 208..223.
    s = _start(5) + 2
    cols = torch.cat([qkv[80:96], qkv[208:224]])
    assert torch.equal(tape[s].view(32, 32, 8), cols[:, 512:768].reshape(32, 32, 8).transpose(0, 1))
