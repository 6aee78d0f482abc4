"""Decode-graph inputs read from the host's packed buffer (worker/cuda_graphs.py): the packed layout,
the host-side packing (a pure function) and the in-graph loading kernel (rows copied, block tables
spread out, pending tokens taken from the previous step's output, the sampling seed and
temperatures). No graph is captured on the CPU: there the loading kernel runs in Triton's
interpreter, which is all of a replay but the replay itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagellm.worker.cuda_graphs import DecodeGraphs, DecodeInputLayout, DecodeInputs, pack_decode_inputs

LAYOUT = DecodeInputLayout(max_batch=16, max_blocks_per_seq=6)


def host_views(layout: DecodeInputLayout) -> DecodeInputs:
    buffer = torch.full((layout.nbytes,), 0xAB, dtype=torch.uint8)  # garbage that packing must overwrite
    return DecodeInputs(*(v.numpy() for v in layout.views(buffer)))


def test_layout_regions_are_aligned_disjoint_and_typed():
    views = LAYOUT.views(torch.zeros(LAYOUT.nbytes, dtype=torch.uint8))
    spans = []
    for name, view in zip(DecodeInputs._fields, views):
        start = LAYOUT.offsets[name]
        assert start % 256 == 0
        spans.append((start, start + view.numel() * view.element_size()))
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= LAYOUT.nbytes
    assert [v.dtype for v in views] == [torch.int64] * 5 + [torch.float32] + [torch.int32] * 3
    assert views.input_ids.numel() == 16 and views.tables.numel() == 16 * 6 and views.header.numel() == 4
    with pytest.raises(ValueError, match="uint8"):
        LAYOUT.views(torch.zeros(LAYOUT.nbytes, dtype=torch.int32))


def test_pack_writes_rows_padding_and_pending_tokens():
    host = host_views(LAYOUT)
    tables = [[7, 8, 9], [4], [1, 2, 3, 5, 6]]
    pack_decode_inputs(host, LAYOUT, 8, [11, 0, 13], [5, 2, 70], [119, 34, 1 * 16 + 5], [6, 3, 71],
                       tables, pending_rows=[1], pending_sources=[4], previous_address=123456,
                       temperature=[0.0, 0.5, 1.25], seed=2**31 + 9)
    assert host.input_ids[:8].tolist() == [11, -1, 13, 0, 0, 0, 0, 0]   # -1: taken from the previous step
    assert host.prev_rows[1] == 4
    assert host.positions[:8].tolist() == [5, 2, 70, 0, 0, 0, 0, 0]
    assert host.slot_mapping[:8].tolist() == [119, 34, 21, -1, -1, -1, -1, -1]  # padding writes nothing
    assert host.seq_lens[:8].tolist() == [6, 3, 71, 1, 1, 1, 1, 1]
    assert host.seq_order[:8].tolist() == [2, 0, 1, 3, 4, 5, 6, 7]         # longest first, padding last
    assert host.temperature[:8].tolist() == [0.0, 0.5, 1.25, 0, 0, 0, 0, 0]  # padding rows are greedy
    assert host.header.tolist() == [123456, 5, 9, 0]                        # the seed masked to 31 bits
    packed = host.tables[:8 * 5].reshape(8, 5)  # [size, width], zero beyond each table and on padding rows
    expected = np.zeros((8, 5), dtype=np.int32)
    for row, table in enumerate(tables):
        expected[row, :len(table)] = table
    np.testing.assert_array_equal(packed, expected)


@pytest.mark.parametrize("kwargs,match", [
    (dict(size=2), "batch"),
    (dict(size=32), "max_batch"),
    (dict(block_tables=[[1] * 7, [2], [3]]), "at most 6"),
    (dict(seq_lens=[1, 2]), "seq_lens"),
    (dict(pending_rows=[3], pending_sources=[0]), "pending_rows"),
    (dict(pending_rows=[0], pending_sources=[]), "must match"),
    (dict(temperature=[1.0]), "temperature"),
])
def test_pack_rejects_bad_steps(kwargs, match):
    args = dict(size=4, input_ids=[1, 2, 3], positions=[0, 0, 0], slot_mapping=[0, 1, 2], seq_lens=[1, 1, 1],
                block_tables=[[0], [1], [2]])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pack_decode_inputs(host_views(LAYOUT), LAYOUT, **args)


def test_pack_without_temperatures_is_all_greedy():
    host = host_views(LAYOUT)
    pack_decode_inputs(host, LAYOUT, 2, [1], [0], [0], [1], [[0]])
    assert host.temperature[:2].tolist() == [0.0, 0.0] and host.header.tolist() == [0, 1, 0, 0]


def make_graphs(device: str = "cpu") -> DecodeGraphs:
    return DecodeGraphs(torch.nn.Module(), max_batch=20, max_blocks_per_seq=9, max_model_len=144,
                        device=torch.device(device))


# The loading kernel runs on the CPU only through Triton's interpreter, which is on where CUDA is not.
ON_DEVICES = pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="Triton compiles for CUDA here")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs CUDA")])])


@ON_DEVICES
def test_stage_and_load_fill_the_static_inputs(device: str):
    graphs = make_graphs(device)
    # The previous step's sampled tokens (any integer dtype, any stride: copied to int64 if need be).
    previous = torch.tensor([[500, 0], [501, 0], [502, 0], [503, 0]], dtype=torch.int32, device=device)[:, 0]
    tables = [[3, 4, 5, 6, 7, 8, 9], [10], [11, 12], [13, 14, 15]]
    size, slot = graphs.stage([0, 42, 0, 43], [100, 3, 20, 40], [57, 162, 193, 232], [101, 4, 21, 41], tables,
                              pending_rows=[0, 2], pending_sources=[3, 1], previous_sampled=previous,
                              temperature=[0.0, 0.7, 1.0, 2.5], seed=77)
    assert size == 4
    graphs.load_inputs(size, slot)
    assert graphs.input_ids[:4].tolist() == [503, 42, 501, 43]
    assert graphs.inputs.temperature[:4].tolist() == pytest.approx([0.0, 0.7, 1.0, 2.5])
    assert graphs.seed.tolist() == [77]
    assert graphs.inputs.seq_order[:4].tolist() == [0, 3, 2, 1]
    assert graphs.positions[:4].tolist() == [100, 3, 20, 40]
    assert graphs.slot_mapping[:4].tolist() == [57, 162, 193, 232]
    assert graphs.seq_lens[:4].tolist() == [101, 4, 21, 41]
    for row, table in enumerate(tables):
        assert graphs.block_tables[row, :len(table)].tolist() == table  # row stride 9, not the width 7

    # A wider batch with narrower tables: padding rows run as harmless dummies; columns past a row's
    # table may hold older entries (attention never reads them).
    tables = [[1], [2, 3], [4], [5], [6]]
    size, slot = graphs.stage([7, 8, 9, 10, 11], [0, 17, 0, 0, 0], [16, 49, 64, 80, 96], [1, 18, 1, 1, 1], tables)
    assert size == 8
    graphs.load_inputs(size, slot)
    assert graphs.inputs.temperature[:8].tolist() == [0.0] * 8 and graphs.seed.tolist() == [0]
    assert graphs.input_ids[:8].tolist() == [7, 8, 9, 10, 11, 0, 0, 0]
    assert graphs.slot_mapping[:8].tolist() == [16, 49, 64, 80, 96, -1, -1, -1]
    assert graphs.seq_lens[:8].tolist() == [1, 18, 1, 1, 1, 1, 1, 1]
    for row, table in enumerate(tables):
        assert graphs.block_tables[row, :len(table)].tolist() == table
    assert graphs.block_tables[5:8, :2].tolist() == [[0, 0]] * 3


def test_staging_alternates_host_buffers():
    # Step N + 1 must not overwrite the buffer step N's (possibly in-flight) copy reads from.
    graphs = make_graphs()
    _, first = graphs.stage([1], [0], [0], [1], [[0]])
    _, second = graphs.stage([2], [0], [0], [1], [[0]])
    assert second != first
    assert graphs._host_views[first].input_ids[0] == 1 and graphs._host_views[second].input_ids[0] == 2


def test_stage_validates_pending_tokens():
    graphs = make_graphs()
    with pytest.raises(ValueError, match="previous_sampled"):
        graphs.stage([0], [0], [0], [1], [[0]], pending_rows=[0], pending_sources=[0])
    with pytest.raises(ValueError, match="previous_sampled"):
        graphs.stage([0], [0], [0], [1], [[0]], pending_rows=[0], pending_sources=[0],
                     previous_sampled=torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="pending_sources"):
        graphs.stage([0], [0], [0], [1], [[0]], pending_rows=[0], pending_sources=[2],
                     previous_sampled=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="1 to 20 rows"):
        graphs.stage([0] * 21, [0] * 21, [0] * 21, [1] * 21, [[0]] * 21)


class _EchoModel(torch.nn.Module):
    """Returns each row's inputs as its 'logits': [ids, positions, slots, seq_lens, sum of 4 table entries]."""

    def forward(self, input_ids, positions, meta):
        return torch.stack([input_ids, positions, meta.slot_mapping, meta.seq_lens.long(),
                            meta.block_tables[:, :4].long().sum(1)], dim=1)

    def compute_logits(self, hidden, out=None):
        return hidden * 1 if out is None else torch.mul(hidden, 1, out=out)  # as an LM head writes


def _echo_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """A 'sampler' whose tokens show what it was given: input id + 7 + 1000 * temperature + seed."""
    return logits[:, 0] + 7 + (temperature * 1000).long() + seed


class _EagerGraph:
    """Stands in for a captured graph on the CPU: runs the captured function again into its outputs."""

    def __init__(self, graphs: DecodeGraphs, size: int, slot: int) -> None:
        self.graphs, self.size, self.slot = graphs, size, slot

    def replay(self) -> None:
        self.graphs.sampled[self.size, self.slot].copy_(self.graphs._run(self.size, self.slot)[1])


@ON_DEVICES
def test_replay_from_host_over_many_steps_without_syncs(device: str):
    # Twelve steps enqueued back to back (no host sync), some taking tokens from the step before
    # (straight from the graph's sampled output): each replay must see exactly its own inputs (on
    # CUDA: no host buffer was refilled, and no sampled output overwritten, too early). Logits are
    # read within their step, as the engine reads them.
    graphs = DecodeGraphs(_EchoModel(), max_batch=20, max_blocks_per_seq=9, max_model_len=144,
                          device=torch.device(device), sample=_echo_sample)
    if device == "cuda":
        graphs.capture()
    else:
        graphs.logits = torch.empty(graphs.max_batch, 5, dtype=torch.int64)
        for size in graphs.sizes:
            for slot in (0, 1):
                graphs.sampled[size, slot] = graphs._run(size, slot)[1]
                graphs.graphs[size, slot] = _EagerGraph(graphs, size, slot)
    rng = np.random.default_rng(0)
    previous, outputs, expected = None, [], []  # expected[step]: the inputs the graph must see, and its tokens
    for _ in range(12):
        b = int(rng.integers(1, 21))
        ids = rng.integers(0, 1000, b).tolist()
        positions = rng.integers(0, 140, b).tolist()
        slots = rng.integers(0, 4000, b).tolist()
        tables = [rng.integers(0, 200, int(rng.integers(4, 10))).tolist() for _ in range(b)]
        temperature = (rng.integers(0, 4, b) / 4).tolist()
        seed = int(rng.integers(0, 2**31))
        pending = [] if previous is None else sorted(rng.choice(b, size=min(b, 3), replace=False).tolist())
        sources = [int(rng.integers(0, previous.numel())) for _ in pending] if pending else []
        step = graphs.replay_from_host(ids, positions, slots, [p + 1 for p in positions], tables, pending, sources,
                                       previous, temperature, seed)
        outputs.append((step.logits.clone(), step.sampled.clone()))  # in stream order, before the next replay
        row_ids = list(ids)
        for row, src in zip(pending, sources):
            row_ids[row] = expected[-1][1][src]  # what `previous` holds, known without reading it
        inputs = [[row_ids[i], positions[i], slots[i], positions[i] + 1, sum(tables[i][:4])] for i in range(b)]
        expected.append((inputs, [row_ids[i] + 7 + int(temperature[i] * 1000) + seed for i in range(b)]))
        previous = step.sampled  # the graph's own output, never read back by the step
    if device == "cuda":
        torch.cuda.synchronize()
    for (logits, sampled), (inputs, tokens) in zip(outputs, expected):
        assert logits.cpu().tolist() == inputs
        assert sampled.cpu().tolist() == tokens
