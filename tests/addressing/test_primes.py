from __future__ import annotations

import numpy as np

from engram.addressing.primes import assign_primes, is_prime, next_prime


def test_is_prime_matches_a_sieve():
    n = 200_000
    sieve = np.ones(n, bool)
    sieve[:2] = False
    for i in range(2, int(n**0.5) + 1):
        if sieve[i]:
            sieve[i * i:: i] = False
    assert [i for i in range(n) if is_prime(i)] == list(np.flatnonzero(sieve))


def test_large_primes_and_strong_pseudoprimes():
    assert is_prime(2**61 - 1)
    assert not is_prime(3215031751)          # strong pseudoprime to bases 2, 3, 5, 7
    assert not is_prime(3825123056546413051)  # strong pseudoprime to bases 2..23
    assert is_prime(18446744073709551557)     # largest prime below 2**64


def test_next_prime_skips_taken():
    assert next_prime(10, set()) == 11
    assert next_prime(10, {11, 13}) == 17


def test_one_sequence_across_layers_orders_heads():
    primes = assign_primes([0, 2], [10, 10], 2)
    # layer 0 order 2 starts at >= 10; order 3 restarts at its base but skips taken primes
    assert primes == {0: ((11, 13), (17, 19)), 2: ((23, 29), (31, 37))}
    assert assign_primes([5], [11], 1) == {5: ((11,),)}  # the base itself when prime
