"""The one chooser, without a cluster: which transport carries which hop, forced or not."""

from __future__ import annotations

import pytest

from nbparallel.dataplane import transport
from nbparallel.dataplane.transport import (ANY_ENGINE, CUDA_IPC, DIRECT, ENGINE, HANDOFF_LIMIT,
                                            INLINE, INLINE_LIMIT, NOTEBOOK, SHM, Hop, choose)
from nbparallel.errors import UsageError

BIG = 1 << 20


def test_every_named_transport_is_registered_in_rank_order():
    names = [t.name for t in transport.registered()]
    assert sorted(names) == sorted(transport.NAMES)
    assert names == [CUDA_IPC, SHM, INLINE, DIRECT]
    assert set(transport.OPTIONS) - {"auto"} == {t.name for t in transport.registered() if t.forceable}


@pytest.mark.parametrize("hop, want", [
    (Hop(local=True, nbytes=BIG), SHM),
    (Hop(local=False, nbytes=BIG), DIRECT),
    (Hop(local=True, nbytes=INLINE_LIMIT - 1), INLINE),
    (Hop(local=False, nbytes=0), INLINE),
    (Hop(receiver=ANY_ENGINE, local=False, nbytes=BIG), INLINE),  # no channel to "any engine"
    (Hop(receiver=ANY_ENGINE, local=True, nbytes=BIG), SHM),
    (Hop(sender=ENGINE, receiver=NOTEBOOK, local=True, nbytes=BIG), SHM),
    (Hop(sender=ENGINE, receiver=NOTEBOOK, local=False, nbytes=BIG), DIRECT),
    (Hop(sender=ENGINE, local=True, nbytes=HANDOFF_LIMIT - 1), DIRECT),  # the channel itself
    (Hop(sender=ENGINE, local=True, nbytes=HANDOFF_LIMIT), SHM),
    (Hop(sender=ENGINE, local=False, nbytes=BIG), DIRECT),
    (Hop(sender=ENGINE, local=True, nbytes=BIG, device=True, gpu=True), CUDA_IPC),
    (Hop(local=True, nbytes=BIG, device=True, gpu=False), SHM),  # the receiver has no GPU
])
def test_auto_takes_the_first_transport_that_suits(hop, want):
    assert choose(hop) == want


def test_a_full_transport_hands_the_hop_to_the_next():
    hop = Hop(local=True, nbytes=BIG)
    assert choose(hop, without={SHM}) == DIRECT
    engine_hop = Hop(sender=ENGINE, local=True, nbytes=BIG, device=True, gpu=True)
    assert choose(engine_hop, without={CUDA_IPC}) == SHM
    assert choose(engine_hop, without={CUDA_IPC, SHM}) == DIRECT


def test_cuda_ipc_follows_the_config_switch(monkeypatch):
    from nbparallel import config

    monkeypatch.setattr(config, "cuda_ipc", False)
    assert choose(Hop(sender=ENGINE, local=True, nbytes=BIG, device=True, gpu=True)) == SHM


def test_a_forced_transport_is_honoured_where_it_reaches():
    assert choose(Hop(local=True, nbytes=BIG), DIRECT) == DIRECT
    assert choose(Hop(local=False, nbytes=BIG), INLINE) == INLINE
    assert choose(Hop(local=True, nbytes=BIG), SHM) == SHM
    # Small values keep riding in the message whatever was forced, as they always have.
    assert choose(Hop(local=False, nbytes=10), SHM) == INLINE


def test_a_forced_transport_that_cannot_reach_says_why_and_names_the_engine():
    with pytest.raises(UsageError, match=r"--transport shm needs engines on this host.*engine 7 "
                                         r"does not.*--transport direct"):
        choose(Hop(local=False, nbytes=BIG), SHM, engine=7)
    with pytest.raises(UsageError, match=r"--transport direct cannot reach engine -1"):
        choose(Hop(receiver=ANY_ENGINE, nbytes=BIG), DIRECT)
    with pytest.raises(UsageError, match=r"unknown transport 'ucx'; use one of auto, shm, direct, ipp"):
        choose(Hop(), "ucx")


def test_a_new_transport_is_one_class_and_one_registration():
    class Loopback(transport.Transport):
        name = "loopback"
        rank = -1

        @staticmethod
        def reaches(hop: Hop) -> bool:
            return hop.local and hop.nbytes > 1 << 30

    before = transport.registered()
    try:
        transport.register(Loopback)
        assert choose(Hop(local=True, nbytes=2 << 30)) == "loopback"
        assert choose(Hop(local=True, nbytes=BIG)) == SHM
        assert transport.get("loopback") is Loopback
    finally:
        transport._registry[:] = before
    assert transport.registered() == before


def test_engine_to_engine_messages_name_their_transport():
    header = transport.wire(SHM, b"\x80rest\0of it")
    carrier, inner = transport.unwire(header)
    assert carrier.name == SHM and inner == b"\x80rest\0of it"
    with pytest.raises(KeyError, match="no transport called 'nope'"):
        transport.unwire(b"nope\0x")
    with pytest.raises(ValueError):
        transport.unwire(b"no separator")
