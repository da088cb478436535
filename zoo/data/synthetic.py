"""Synthetic recall tasks: selective copying, induction heads, multi-query associative recall (MQAR).

Each task is a batch generator, ``<task>_batch(batch_size, seq_len, ..., generator=None)``, that returns
``{"input_ids": LongTensor [B, T], "labels": LongTensor [B, T]}`` ready for ``model(**batch).loss`` on any
Hugging Face causal LM. Labels follow the Hugging Face convention: the model shifts them, so ``labels[:, t]``
is the answer the model must give at position ``t - 1``; every other label is -100 (ignored by the loss and
by the accuracy). Defaults are the papers' settings:

- selective copying (Mamba, Gu & Dao): length 4096, vocabulary 16 with a noise token, 16 tokens to copy;
- induction heads (Mamba; H3's formulation): length 256 for training, vocabulary 16;
- MQAR (Zoology, Arora et al.): vocabulary 8192, keys and values from separate vocabulary halves,
  queries at power-law gaps (``power_a`` 0.01), filler zeros (``random_non_queries=False``, as in the
  paper's Figure 2 configs).

Generation is vectorized and deterministic given a ``torch.Generator``. ``SyntheticDataset`` is a
map-style dataset whose item ``i`` depends only on ``(seed, i)``, so it is reproducible under any sampler or
number of workers.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


def selective_copying_batch(
    batch_size: int,
    seq_len: int = 4096,
    n_tokens: int = 16,
    vocab_size: int = 16,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Selective copying: remember the data tokens scattered among noise and emit them in order.

    Layout of one row (``C = seq_len - n_tokens - 1`` context positions)::

        [ noise (0) with n_tokens data tokens at sorted random positions ]  [ marker x (n_tokens + 1) ]
          positions 0 .. C-1                                                 positions C .. seq_len-1

    Data tokens are drawn from ``1 .. vocab_size - 2``; 0 is noise and ``vocab_size - 1`` the marker. The
    model must output the i-th data token at the i-th marker (position ``C + i``), so
    ``labels[:, C + 1 + i]`` holds it; the last marker only closes the row (its prediction is unused).

    Args:
        batch_size: rows B.
        seq_len: total row length T (context + markers).
        n_tokens: data tokens to copy per row.
        vocab_size: including the noise and marker tokens (>= 3).
        generator: torch.Generator for reproducibility.

    Returns:
        dict with ``input_ids`` and ``labels``, both LongTensor [B, T].
    """
    if n_tokens < 1:
        raise ValueError(f"selective copying: n_tokens={n_tokens} must be >= 1 (tokens to copy per row)")
    if vocab_size < 3:
        raise ValueError(f"selective copying: vocab_size={vocab_size} must be >= 3 (noise, marker, data)")
    context = seq_len - n_tokens - 1
    if context < n_tokens:
        raise ValueError(
            f"selective copying: seq_len={seq_len} too short for n_tokens={n_tokens}; "
            f"need seq_len >= {2 * n_tokens + 1}"
        )
    marker = vocab_size - 1
    # positions without replacement: the n largest of iid uniforms form a uniform random subset
    positions = torch.rand(batch_size, context, generator=generator).topk(n_tokens, dim=-1).indices
    positions = positions.sort(dim=-1).values  # (B, n_tokens)
    tokens = torch.randint(1, marker, (batch_size, n_tokens), generator=generator)
    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    input_ids.scatter_(1, positions, tokens)
    input_ids[:, context:] = marker
    labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels[:, context + 1 :] = tokens
    return {"input_ids": input_ids, "labels": labels}


def induction_heads_batch(
    batch_size: int,
    seq_len: int = 256,
    vocab_size: int = 16,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Induction heads: recall the token that followed the trigger token the first time it appeared.

    Layout of one row: random tokens from ``0 .. vocab_size - 2``; the trigger ``vocab_size - 1`` appears
    exactly twice, at a uniform position ``p`` in ``[0, seq_len - 4]`` followed by the answer ``a``, and at
    ``seq_len - 2``; the row ends with ``a``. Only ``labels[:, seq_len - 1] = a`` is supervised: the model
    must answer at the second trigger.

    Args:
        batch_size: rows B.
        seq_len: total row length T (>= 4); the Mamba paper trains at 256 and tests 2^6 .. 2^20.
        vocab_size: including the trigger token (>= 3).
        generator: torch.Generator for reproducibility.

    Returns:
        dict with ``input_ids`` and ``labels``, both LongTensor [B, T].
    """
    if seq_len < 4:
        raise ValueError(f"induction heads: seq_len={seq_len} must be >= 4")
    if vocab_size < 3:
        raise ValueError(f"induction heads: vocab_size={vocab_size} must be >= 3")
    trigger = vocab_size - 1
    input_ids = torch.randint(0, trigger, (batch_size, seq_len), generator=generator)
    first = torch.randint(0, seq_len - 3, (batch_size, 1), generator=generator)  # p + 1 <= seq_len - 3
    answer = input_ids.gather(1, first + 1)  # (B, 1)
    input_ids.scatter_(1, first, trigger)
    input_ids[:, -2] = trigger
    input_ids[:, -1:] = answer
    labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels[:, -1:] = answer
    return {"input_ids": input_ids, "labels": labels}


def mqar_gap_distribution(space: int, power_a: float = 0.01) -> torch.Tensor:
    """Zoology's query-gap law over ``range(space)``: ``p[g] ∝ power_a * (g + 1) ** (power_a - 1)``.

    ``power_a = 1`` is uniform; the paper's 0.01 puts most queries close to the key-value context.

    Returns:
        float64 tensor [space] summing to 1.
    """
    g = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * g ** (power_a - 1)
    if torch.isfinite(p.sum()):  # (kept as it was where it is finite: the same draws, the same task rows)
        return p / p.sum()
    # the power overflowed to inf (then NaN) from power_a ~130 at space 256: normalized in log space
    return torch.softmax((power_a - 1) * g.log(), dim=0)


# torch.multinomial refuses more categories ("number of categories cannot exceed 2^24"): MQAR rows longer than 2^25
_MULTINOMIAL_MAX_CATEGORIES = 2**24


def sample_without_replacement(weights: torch.Tensor, batch_size: int, n: int,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` distinct indices per row, each drawn with probability proportional to the ``weights`` [K] not drawn yet
    (``torch.multinomial(weights.expand(batch_size, K), n, replacement=False)``'s law), as LongTensor [B, n].

    Up to 2^24 categories this is torch.multinomial itself (the same draws for the same generator state). Above it,
    where torch.multinomial refuses, each draw is an inverse-CDF draw (torch.searchsorted over the cumulative
    weights) redrawn while it repeats one of its row's earlier draws: a draw conditioned on missing the taken indices
    is proportional to the remaining weights, the sequential law of sampling without replacement."""
    space = weights.shape[-1]
    if space <= _MULTINOMIAL_MAX_CATEGORIES:
        return torch.multinomial(weights.expand(batch_size, space), n, replacement=False, generator=generator)
    weights = weights.to(torch.float64)
    if int((weights > 0).sum()) < n:
        raise ValueError(f"cannot draw {n} distinct indices from {int((weights > 0).sum())} of nonzero weight")
    cdf = weights.cumsum(0)
    last = int((weights > 0).nonzero()[-1])  # a u * total rounded up to total lands on the last drawable index
    out = torch.empty(batch_size, n, dtype=torch.long)
    for j in range(n):
        pending = torch.arange(batch_size)
        while pending.numel():
            u = torch.rand(pending.numel(), dtype=torch.float64, generator=generator) * cdf[-1]
            draw = torch.searchsorted(cdf, u, right=True).clamp_(max=last)
            repeat = (out[pending, :j] == draw[:, None]).any(1)
            out[pending[~repeat], j] = draw[~repeat]
            pending = pending[repeat]
    return out


def mqar_batch(
    batch_size: int,
    seq_len: int = 256,
    n_kv: int = 16,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    random_non_queries: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Multi-query associative recall (Zoology's ``multiquery_ar``, with Hugging Face label alignment).

    Layout of one row (``C = 2 * n_kv``)::

        k_0 v_0 k_1 v_1 ... k_{n-1} v_{n-1} | filler with each key once more, at C + 2 * g_j
        positions 0 .. C-1                    positions C .. seq_len-1

    Keys are distinct tokens from ``[1, vocab_size // 2)``, values distinct tokens from
    ``[vocab_size // 2, vocab_size)``. Query slots ``g_j`` are drawn without replacement from
    ``mqar_gap_distribution((seq_len - C) // 2, power_a)``. The answer to the query at position ``q`` is its
    value, at ``labels[:, q + 1]``; the input token at ``q + 1`` is filler, exactly as in Zoology, whose
    ``(inputs, shifted labels)`` pairs this reproduces. Filler is 0, or uniform random tokens over the whole
    vocabulary with ``random_non_queries=True`` (Zoology's function default).

    Args:
        batch_size: rows B.
        seq_len: total row length T; needs ``4 * n_kv <= T``.
        n_kv: key-value pairs per row (and queries per row).
        vocab_size: total vocabulary; needs ``n_kv <= vocab_size // 2 - 1``.
        power_a: exponent of the gap law (0.01 as in the paper, 1.0 uniform).
        random_non_queries: fill non-query positions with random tokens instead of 0.
        generator: torch.Generator for reproducibility.

    Returns:
        dict with ``input_ids`` and ``labels``, both LongTensor [B, T]; exactly ``n_kv`` labels per row.
    """
    if n_kv < 1:
        raise ValueError(f"mqar: n_kv={n_kv} must be >= 1 (key-value pairs per row)")
    if not (power_a > 0 and math.isfinite(power_a)):
        raise ValueError(f"mqar: power_a={power_a} must be > 0 and finite (the query-gap law's exponent; 1.0 is "
                         f"uniform)")
    if 4 * n_kv > seq_len:
        raise ValueError(f"mqar: n_kv={n_kv} needs seq_len >= 4 * n_kv = {4 * n_kv}, got seq_len={seq_len}")
    half = vocab_size // 2
    if n_kv > half - 1:
        # keys are 1 .. vocab_size // 2 - 1 (0 is filler), values vocab_size // 2 .. vocab_size - 1
        raise ValueError(f"mqar: vocab_size={vocab_size} has {half - 1} keys, fewer than n_kv={n_kv}; pass "
                         f"vocab_size >= 2 * n_kv + 2 = {2 * n_kv + 2} or a smaller n_kv")
    context = 2 * n_kv
    space = (seq_len - context) // 2
    # distinct keys and values per row, in random order: top-n_kv indices of iid uniforms over each half
    keys = torch.rand(batch_size, half - 1, generator=generator).topk(n_kv, dim=-1).indices + 1
    values = torch.rand(batch_size, vocab_size - half, generator=generator).topk(n_kv, dim=-1).indices + half
    # (B, n_kv), key j -> slot; torch.multinomial up to 2^24 slots (seq_len ~2^25), inverse-CDF draws above
    gaps = sample_without_replacement(mqar_gap_distribution(space, power_a), batch_size, n_kv, generator)
    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    input_ids[:, 0:context:2] = keys
    input_ids[:, 1:context:2] = values
    query_pos = context + 2 * gaps
    input_ids.scatter_(1, query_pos, keys)
    labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, query_pos + 1, values)
    if random_non_queries:
        noise = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
        input_ids = torch.where(input_ids == 0, noise, input_ids)
    return {"input_ids": input_ids, "labels": labels}


TASKS = {
    "selective_copying": selective_copying_batch,
    "induction_heads": induction_heads_batch,
    "mqar": mqar_batch,
}

# the task argument that counts the items to recall ("number of kv pairs" in reports); None: no such knob
COUNT_ARGUMENT = {"selective_copying": "n_tokens", "induction_heads": None, "mqar": "n_kv"}


def _task_fn(task: str):
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {sorted(TASKS)}") from None


def make_batch(
    task: str,
    batch_size: int,
    seq_len: int | None = None,
    generator: torch.Generator | None = None,
    **task_kwargs,
) -> dict[str, torch.Tensor]:
    """One batch of ``task`` ('selective_copying', 'induction_heads', 'mqar').

    Args:
        task: task name (see ``TASKS``).
        batch_size: rows B.
        seq_len: row length T; None takes the task's default.
        generator: torch.Generator for reproducibility.
        task_kwargs: task arguments (``n_kv``, ``n_tokens``, ``vocab_size``, ``power_a``, ...).

    Returns:
        dict with ``input_ids`` and ``labels``, both LongTensor [B, T].
    """
    fn = _task_fn(task)
    if seq_len is not None:
        task_kwargs["seq_len"] = seq_len
    return fn(batch_size, generator=generator, **task_kwargs)


def item_seed(seed: int, index: int) -> int:
    """Generator seed of item ``index`` of a dataset with ``seed``.

    torch's CPU generator keeps only 32 bits of a seed, so (seed, index) is folded into 32 bits: a
    bijection in ``index`` (no two items of one dataset share a stream) whose offset between seeds is a
    multiple of the golden-ratio constant. Datasets whose seeds differ by at most 20 share no item below ~1.5·10^8
    items; seeds further apart can meet sooner, most at Fibonacci differences (89 apart: after ~2.2·10^7 items,
    987 apart: ~1.9·10^6), so the seeds one run uses side by side (train, held-out, eval) are kept a few apart.
    """
    return (index + seed * 0x9E3779B9) % 2**32


def shared_item(seed_a: int, n_a: int, seed_b: int, n_b: int) -> tuple[int, int] | None:
    """(index in a, index in b) of an item that the first n_a items of a dataset with seed_a and the first n_b of one
    with seed_b share, drawn from the same generator seed (`item_seed`): the same row under the same task settings;
    None where they share none. Exact: each one's item seeds are a run of consecutive integers mod 2**32."""
    modulus = 2**32
    a, b = item_seed(seed_a, 0), item_seed(seed_b, 0)
    if n_a > 0 and n_b > 0:
        if (b - a) % modulus < n_a:  # b's first item lies among a's
            return (b - a) % modulus, 0
        if (a - b) % modulus < n_b:
            return 0, (a - b) % modulus
    return None


class SyntheticDataset(Dataset):
    """Map-style dataset of ``n_samples`` rows of a synthetic task; row ``i`` depends only on ``(seed, i)``.

    Items are ``{"input_ids": LongTensor [T], "labels": LongTensor [T]}``; the default collate stacks them
    into a batch for ``model(**batch)``.
    """

    def __init__(
        self, task: str, n_samples: int, seq_len: int | None = None, seed: int = 0, **task_kwargs
    ) -> None:
        _task_fn(task)
        self.task = task
        self.n_samples = n_samples
        self.seq_len = seq_len
        self.seed = seed
        self.task_kwargs = task_kwargs

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # a numpy or 0-d tensor integer as a Python int: Subset(dataset, np.arange(n)) and SubsetRandomSampler hand out
        # numpy ones, which torch's manual_seed refused (np.int32 overflowed in item_seed first)
        index = operator.index(index)
        if not 0 <= index < self.n_samples:
            raise IndexError(f"index {index} out of range for {self.n_samples} samples")
        generator = torch.Generator().manual_seed(item_seed(self.seed, index))
        batch = make_batch(self.task, 1, self.seq_len, generator=generator, **self.task_kwargs)
        return {key: value[0] for key, value in batch.items()}
