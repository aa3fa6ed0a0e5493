"""Prime table sizes, assigned by the reference rule.

Every head of every order of every layer gets its own prime. Walking `layer_ids` in order, then
orders 2..N, then heads, each head takes the smallest prime that is >= the order's base size (for
its first head) or > the previous head's prime, and that no earlier head has taken.
"""

from __future__ import annotations

from collections.abc import Sequence

# Deterministic Miller-Rabin: these witnesses are exact for every n < 3.3e24 (Sorenson & Webster 2015).
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Exact primality for any n below 3.3e24."""
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(after: int, taken: set[int]) -> int:
    """The smallest prime > `after` that is not in `taken`."""
    candidate = after + 1
    while not (is_prime(candidate) and candidate not in taken):
        candidate += 1
    return candidate


def assign_primes(
    layer_ids: Sequence[int], base_sizes: Sequence[int], heads_per_order: int
) -> dict[int, tuple[tuple[int, ...], ...]]:
    """{layer_id: ((primes of order 2 heads), (primes of order 3 heads), ...)}."""
    taken: set[int] = set()
    out: dict[int, tuple[tuple[int, ...], ...]] = {}
    for layer_id in layer_ids:
        orders = []
        for base in base_sizes:
            heads, last = [], base - 1
            for _ in range(heads_per_order):
                last = next_prime(last, taken)
                taken.add(last)
                heads.append(last)
            orders.append(tuple(heads))
        out[layer_id] = tuple(orders)
    return out
