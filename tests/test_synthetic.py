"""Synthetic task generators match their specs: layout, label masks, vocab halves, distances, gap law."""

from __future__ import annotations

import pytest
import torch

from zoo.data.synthetic import (
    IGNORE_INDEX,
    SyntheticDataset,
    induction_heads_batch,
    make_batch,
    mqar_batch,
    mqar_gap_distribution,
    selective_copying_batch,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- MQAR


@pytest.mark.parametrize("seq_len,n_kv", [(64, 4), (128, 8), (256, 16), (257, 64)], ids=lambda v: str(v))
def test_mqar_layout(seq_len, n_kv):
    vocab = 8192
    batch = mqar_batch(32, seq_len, n_kv, vocab_size=vocab, generator=gen())
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape == y.shape == (32, seq_len) and x.dtype == y.dtype == torch.long
    context = 2 * n_kv
    keys, values = x[:, 0:context:2], x[:, 1:context:2]
    # keys and values from separate halves, distinct within a row
    assert ((keys >= 1) & (keys < vocab // 2)).all()
    assert ((values >= vocab // 2) & (values < vocab)).all()
    for row in range(32):
        assert keys[row].unique().numel() == n_kv and values[row].unique().numel() == n_kv
    # exactly n_kv answers per row, all after the context, each one position after its query
    asked = y != IGNORE_INDEX
    assert (asked.sum(1) == n_kv).all()
    assert not asked[:, : context + 1].any()
    for row in range(32):
        answer_pos = asked[row].nonzero().squeeze(1)
        query_pos = answer_pos - 1
        assert ((query_pos - context) % 2 == 0).all()  # queries sit on even offsets after the context
        binding = dict(zip(keys[row].tolist(), values[row].tolist()))
        key_pos = {k: 2 * j for j, k in enumerate(keys[row].tolist())}
        queried = x[row, query_pos].tolist()
        assert sorted(queried) == sorted(binding)  # every key queried exactly once
        for q, k, v in zip(query_pos.tolist(), queried, y[row, answer_pos].tolist()):
            assert binding[k] == v  # the label is the value bound to the queried key
            assert q - key_pos[k] >= 2 and (q - context) // 2 < (seq_len - context) // 2  # after its pair
        # filler is 0 everywhere else after the context (random_non_queries=False)
        filler = torch.ones(seq_len, dtype=torch.bool)
        filler[:context] = False
        filler[query_pos] = False
        assert (x[row, filler] == 0).all()


def test_mqar_gaps_follow_power_law():
    # one query per row: the query slot is an exact draw from the gap law
    seq_len, space = 514, 256
    batch = mqar_batch(20000, seq_len, 1, vocab_size=1024, generator=gen(1))
    query_pos = (batch["labels"] != IGNORE_INDEX).nonzero()[:, 1] - 1
    gaps = (query_pos - 2) // 2
    p = mqar_gap_distribution(space, 0.01)
    # power_a 0.01: p(g) ~ 1/(g+1), so the first 16 slots of 256 carry about half the mass
    for cut in (1, 4, 16, 64):
        expected = p[:cut].sum().item()
        observed = (gaps < cut).float().mean().item()
        assert abs(observed - expected) < 0.02, (cut, observed, expected)
    assert p[:16].sum() > 0.45
    counts = torch.bincount(gaps, minlength=space).float()
    assert counts[:8].mean() > 4 * counts[128:].mean()  # decreasing, heavy head
    # power_a 1 is uniform
    uniform = mqar_batch(20000, seq_len, 1, vocab_size=1024, power_a=1.0, generator=gen(2))
    gaps_u = ((uniform["labels"] != IGNORE_INDEX).nonzero()[:, 1] - 3) // 2
    assert abs(gaps_u.float().mean().item() - (space - 1) / 2) < 3.0


def test_mqar_random_non_queries_keeps_structure():
    plain = mqar_batch(16, 128, 8, generator=gen(3))
    noisy = mqar_batch(16, 128, 8, random_non_queries=True, generator=gen(3))
    assert torch.equal(plain["labels"], noisy["labels"])
    structural = plain["input_ids"] != 0
    assert torch.equal(noisy["input_ids"][structural], plain["input_ids"][structural])
    assert (noisy["input_ids"][~structural] != 0).float().mean() > 0.99


def test_mqar_validation():
    with pytest.raises(ValueError, match="4 \\* n_kv"):
        mqar_batch(2, 64, 17)
    with pytest.raises(ValueError, match="4 \\* n_kv"):  # one short of 4 * n_kv: fewer query slots than keys
        mqar_batch(2, 63, 16)
    with pytest.raises(ValueError, match=r"has 7 keys, fewer than n_kv=8; pass vocab_size >= 2 \* n_kv \+ 2 = 18 "):
        mqar_batch(2, 256, 8, vocab_size=16)
    with pytest.raises(ValueError, match=r"vocab_size >= 2 \* n_kv \+ 2 = 18 "):  # the bound is exact
        mqar_batch(2, 256, 8, vocab_size=17)
    assert mqar_batch(2, 256, 8, vocab_size=18)["labels"].ne(-100).sum() == 16
    # no pair to recall (a RuntimeError from multinomial / topk before) and a gap law that is no distribution
    for n_kv in (0, -1):
        with pytest.raises(ValueError, match=f"n_kv={n_kv} must be >= 1"):
            mqar_batch(2, 64, n_kv, vocab_size=64)
    for power_a in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="power_a=.* must be > 0 and finite"):
            mqar_batch(2, 64, 4, vocab_size=64, power_a=power_a)


def test_mqar_small_vocabulary_uses_each_half_whole():
    # keys are [1, vocab // 2) (0 is the filler) and values [vocab // 2, vocab): with 4 of 4 keys and 4 of 5 values
    # every row has the keys 1..4, and the top value 9 appears
    x = mqar_batch(64, 16, 4, vocab_size=10, generator=gen(9))["input_ids"]
    assert (x[:, 0:8:2].sort(1).values == torch.arange(1, 5)).all()
    values = x[:, 1:8:2]
    assert ((values >= 5) & (values <= 9)).all() and (values == 9).any()
    # random filler is uniform over the whole vocabulary, 0 included (Zoology's random_non_queries)
    noisy = mqar_batch(64, 64, 4, vocab_size=10, random_non_queries=True, generator=gen(9))["input_ids"]
    assert (noisy[:, 8:] == 0).any()


def test_mqar_gap_law_holds_for_large_exponents():
    """The law was normalized after raising to power_a - 1, which overflowed to inf (then NaN) from power_a ~130 at
    a space of 256, and mqar_batch failed in torch.multinomial. The law is unchanged where it was finite (the same
    draws), and a large exponent now puts the queries at the largest gap."""
    space = 256
    g = torch.arange(1, space + 1, dtype=torch.float64)
    for power_a in (0.01, 1.0, 3.0):
        direct = power_a * g ** (power_a - 1)
        assert torch.equal(mqar_gap_distribution(space, power_a), direct / direct.sum())
    p = mqar_gap_distribution(space, 200.0)
    assert torch.isfinite(p).all() and abs(p.sum().item() - 1) < 1e-12 and p.argmax().item() == space - 1
    batch = mqar_batch(4, 2 * space + 2 * 4, 4, vocab_size=64, power_a=200.0, generator=gen(5))
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == 4 * 4


def test_mqar_rows_past_torch_multinomials_category_limit(monkeypatch):
    """Rows longer than 2^25 (a gap space above 2^24) crashed in torch.multinomial, which takes at most 2^24
    categories. The limit is lowered to 64 here (and torch.multinomial made to refuse more, as it does past 2^24),
    so that the inverse-CDF sampler above it runs on small rows: the same law as torch.multinomial without
    replacement; below the limit the draws are torch.multinomial's own, the same rows for the same seed."""
    import zoo.data.synthetic as synthetic

    real = torch.multinomial
    weights = torch.tensor([5.0, 1.0, 0.0, 2.0, 8.0, 0.5, 3.0, 0.0, 1.5, 4.0], dtype=torch.float64)
    below = synthetic.sample_without_replacement(weights, 20000, 3, gen(11))
    assert torch.equal(below, real(weights.expand(20000, 10), 3, replacement=False, generator=gen(11)))
    monkeypatch.setattr(synthetic, "_MULTINOMIAL_MAX_CATEGORIES", 10, raising=False)  # at the limit: the same draws
    assert torch.equal(synthetic.sample_without_replacement(weights, 20000, 3, gen(11)), below)

    def multinomial(p, *args, **kwargs):
        if p.shape[-1] > 64:
            raise RuntimeError("number of categories cannot exceed 2^24")
        return real(p, *args, **kwargs)

    monkeypatch.setattr(synthetic, "_MULTINOMIAL_MAX_CATEGORIES", 4, raising=False)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    above = synthetic.sample_without_replacement(weights, 20000, 3, gen(12))
    assert all(len(set(row)) == 3 for row in above.tolist()) and not (above == 2).any() and not (above == 7).any()
    for j in range(3):  # the law of each of the three draws matches torch.multinomial's
        ours = torch.bincount(above[:, j], minlength=10) / 20000
        theirs = torch.bincount(below[:, j], minlength=10) / 20000
        assert (ours - theirs).abs().max() < 0.02, (j, ours, theirs)
    assert ((torch.bincount(above[:, 0], minlength=10) / 20000 - weights / weights.sum()).abs() < 0.015).all()
    with pytest.raises(ValueError, match="distinct"):
        synthetic.sample_without_replacement(weights, 2, 9, gen(0))

    monkeypatch.setattr(synthetic, "_MULTINOMIAL_MAX_CATEGORIES", 64, raising=False)
    seq_len, space = 514, 256  # one query per row: its slot is an exact draw from the gap law
    batch = mqar_batch(20000, seq_len, 1, vocab_size=1024, generator=gen(1))
    gaps = ((batch["labels"] != IGNORE_INDEX).nonzero()[:, 1] - 1 - 2) // 2
    p = mqar_gap_distribution(space, 0.01)
    for cut in (1, 4, 16, 64, 200):
        assert abs((gaps < cut).float().mean().item() - p[:cut].sum().item()) < 0.02, cut
    batch = mqar_batch(8, 257, 64, vocab_size=8192, generator=gen(2))  # many queries per row: all distinct slots
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) == 64).all()
    x = batch["input_ids"]
    for row in range(8):
        assert sorted(x[row, 128:][x[row, 128:] != 0].tolist()) == sorted(x[row, 0:128:2].tolist())


# ---------------------------------------------------------------- selective copying


@pytest.mark.parametrize("seq_len,n_tokens,vocab", [(4096, 16, 16), (64, 8, 10), (17, 8, 3)], ids=str)
def test_selective_copying_layout(seq_len, n_tokens, vocab):
    batch = selective_copying_batch(16, seq_len, n_tokens, vocab, generator=gen(4))
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape == y.shape == (16, seq_len)
    context = seq_len - n_tokens - 1
    marker = vocab - 1
    assert (x[:, context:] == marker).all()
    data = x[:, :context]
    assert ((data == 0) | ((data >= 1) & (data < marker))).all()
    assert ((data != 0).sum(1) == n_tokens).all()
    # labels: the data tokens in order, answered at markers C .. C+n-1, nothing else supervised
    assert (y[:, : context + 1] == IGNORE_INDEX).all()
    for row in range(16):
        assert y[row, context + 1 :].tolist() == data[row][data[row] != 0].tolist()


def test_selective_copying_defaults_and_spread():
    batch = selective_copying_batch(64, generator=gen(5))
    assert batch["input_ids"].shape == (64, 4096) and batch["input_ids"].max() == 15
    positions = (batch["input_ids"][:, :4079] != 0).nonzero()[:, 1].float()
    assert positions.min() < 200 and positions.max() > 3800  # scattered over the whole context
    with pytest.raises(ValueError, match="too short"):
        selective_copying_batch(2, 32, 16)
    with pytest.raises(ValueError, match="n_tokens=0 must be >= 1"):  # rows with no answer: 0/0 accuracy before
        selective_copying_batch(2, 32, 0)
    with pytest.raises(ValueError, match="vocab_size=2 must be >= 3"):  # no data token between noise and marker
        selective_copying_batch(2, 32, 4, vocab_size=2)


# ---------------------------------------------------------------- induction heads


@pytest.mark.parametrize("seq_len", [4, 256, 4096], ids=str)
def test_induction_heads_layout(seq_len):
    batch = induction_heads_batch(64, seq_len, generator=gen(6))
    x, y = batch["input_ids"], batch["labels"]
    trigger = 15
    assert x.shape == (64, seq_len) and int(x.max()) <= trigger
    assert ((x == trigger).sum(1) == 2).all()
    assert (x[:, -2] == trigger).all()
    first = (x == trigger).int().argmax(1)
    assert (first <= seq_len - 4).all()
    answer = x.gather(1, (first + 1)[:, None]).squeeze(1)
    assert (answer != trigger).all()
    assert torch.equal(y[:, -1], answer) and torch.equal(x[:, -1], answer)
    assert ((y != IGNORE_INDEX).sum(1) == 1).all()
    if seq_len == 4096:  # the first trigger is spread over the row
        assert first.min() < 400 and first.max() > 3600


def test_induction_heads_validation():
    with pytest.raises(ValueError, match="seq_len=3 must be >= 4"):
        induction_heads_batch(2, 3)
    with pytest.raises(ValueError, match="vocab_size=2 must be >= 3"):  # one token besides the trigger: no recall
        induction_heads_batch(2, 16, vocab_size=2)


# ---------------------------------------------------------------- dataset / dispatch


def test_make_batch_and_dataset_are_deterministic():
    a = make_batch("mqar", 4, 64, gen(7), n_kv=4)
    b = make_batch("mqar", 4, 64, gen(7), n_kv=4)
    c = make_batch("mqar", 4, 64, gen(8), n_kv=4)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_batch("copying", 1)
    with pytest.raises(ValueError, match="unknown synthetic task"):  # at construction, not at the first item
        SyntheticDataset("copying", n_samples=4)
    with pytest.raises(ValueError, match="seq_len=0"):  # seq_len 0 is a length, not the task's default
        make_batch("mqar", 2, 0)

    ds = SyntheticDataset("induction_heads", n_samples=10, seq_len=32, seed=3)
    again = SyntheticDataset("induction_heads", n_samples=10, seq_len=32, seed=3)
    other = SyntheticDataset("induction_heads", n_samples=10, seq_len=32, seed=4)
    assert len(ds) == 10
    assert torch.equal(ds[5]["input_ids"], again[5]["input_ids"])
    assert not torch.equal(ds[5]["input_ids"], ds[6]["input_ids"])
    assert not torch.equal(ds[5]["input_ids"], other[5]["input_ids"])
    assert not torch.equal(ds[6]["input_ids"], other[5]["input_ids"])  # nearby seeds are not shifted copies
    for index in (10, -1):
        with pytest.raises(IndexError):
            ds[index]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 32)
    assert torch.equal(batch["input_ids"][1], ds[1]["input_ids"])


def test_dataset_items_by_numpy_and_tensor_indices():
    """Subset(dataset, np.arange(n)) and SubsetRandomSampler(np.arange(n)) index the dataset with numpy integers, which
    torch's manual_seed refused ('an integer is required'; np.int32 overflowed first): any integer index gives the item
    of that Python int."""
    import numpy as np

    ds = SyntheticDataset("mqar", n_samples=8, seq_len=64, seed=1_000_003, n_kv=4, vocab_size=64)
    for index in (np.int64(3), np.int32(3), torch.tensor(3)):
        assert torch.equal(ds[index]["input_ids"], ds[3]["input_ids"]), type(index).__name__
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, np.arange(2, 6)), batch_size=4)
    assert torch.equal(next(iter(loader))["input_ids"], torch.stack([ds[i]["input_ids"] for i in range(2, 6)]))
    with pytest.raises(IndexError):
        ds[np.int64(8)]
    with pytest.raises(TypeError):
        ds[2.0]
