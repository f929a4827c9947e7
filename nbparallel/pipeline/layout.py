"""Where every copy of every stage runs: pipeline rank x data-parallel replica x tensor rank.

Pure (no engines, no NumPy): the runtime builds a :class:`Layout` from the stages' engine groups
and ``--data-parallel``, and asks it which engine holds what. Replica 0 is where the ``%%stage``
cells put the stages; replica ``k`` takes the next unused engines of the pool, in the pool's
order, engine for engine (so a layout is the same every time for the same pool)::

    >>> lay = Layout.build([(0, 1), (2, 3)], [0, 1, 2, 3, 4, 5, 6, 7], replicas=2)
    >>> lay.group(1, 1)
    (6, 7)
    >>> print(lay.grid(["embed", "head"]))
    stage  name   replica 0  replica 1
    0      embed  0, 1       4, 5
    1      head   2, 3       6, 7
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import UsageError

__all__ = ["Layout", "Member"]


@dataclass(frozen=True)
class Member:
    """One engine's place in a layout: its pipeline ``rank`` (the schedule's rank), its data
    parallel ``replica`` and its ``tp`` rank within the stage's tensor-parallel group."""

    engine: int
    rank: int
    replica: int
    tp: int


@dataclass(frozen=True)
class Layout:
    """``groups[s]`` are stage ``s``'s engines in replica 0 (tensor rank order); ``ranks`` the
    distinct groups in stage order, one per pipeline rank; ``copies[k]`` maps each engine of
    replica 0 to its counterpart in replica ``k``."""

    groups: tuple[tuple[int, ...], ...]
    ranks: tuple[tuple[int, ...], ...]
    copies: tuple[dict[int, int], ...]

    @classmethod
    def build(cls, groups: Sequence[Sequence[int]], pool: Sequence[int],
              replicas: int = 1) -> "Layout":
        groups = tuple(tuple(g) for g in groups)
        ranks = tuple(dict.fromkeys(groups))
        seen: dict[int, tuple[int, ...]] = {}
        for g in ranks:
            for e in g:
                if e in seen:
                    raise UsageError(
                        f"the engine groups {list(seen[e])} and {list(g)} share engine {e}; a "
                        f"tensor-parallel stage's --engines must be all of another stage's "
                        f"engines (the same group, for interleaved stages) or none of them. "
                        f"Give each stage its own engines, or the very same group.")
                seen[e] = g
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise UsageError(f"--data-parallel must be a whole number of replicas, 1 or more, "
                             f"not {replicas!r}.")
        used = [e for g in ranks for e in g]
        free = [e for e in pool if e not in seen]
        need = len(used) * replicas
        if need > len(pool):
            raise UsageError(
                f"--data-parallel {replicas} needs {replicas} copies of the stages' {len(used)} "
                f"engine(s), {need} engines, but the pool has {len(pool)}. Use --data-parallel "
                f"{max(1, len(pool) // len(used))} or fewer, or start more engines "
                f"(`%nbp start -n {need}`).")
        copies = [{e: e for e in used}]
        for k in range(1, replicas):
            block = free[(k - 1) * len(used):k * len(used)]
            copies.append(dict(zip(used, block)))
        return cls(groups, ranks, tuple(copies))

    @property
    def replicas(self) -> int:
        return len(self.copies)

    @property
    def tp_sizes(self) -> tuple[int, ...]:
        return tuple(len(g) for g in self.groups)

    def group(self, stage: int, replica: int = 0) -> tuple[int, ...]:
        """Stage ``stage``'s engines in replica ``replica``, tensor rank order."""
        return tuple(self.copies[replica][e] for e in self.groups[stage])

    def rank_group(self, rank: int, replica: int = 0) -> tuple[int, ...]:
        return tuple(self.copies[replica][e] for e in self.ranks[rank])

    def members(self) -> list[Member]:
        """Every engine of the layout, replica by replica, rank by rank, tensor rank by rank."""
        return [Member(self.copies[k][e], r, k, t)
                for k in range(self.replicas)
                for r, g in enumerate(self.ranks)
                for t, e in enumerate(g)]

    def engines(self) -> list[int]:
        return [m.engine for m in self.members()]

    def peers(self, member: Member) -> tuple[int, ...]:
        """The engines ``member``'s gradients are all-reduced with: the same stage and tensor
        rank in every replica, in replica order."""
        e = self.ranks[member.rank][member.tp]
        return tuple(c[e] for c in self.copies)

    def grid(self, names: Sequence[str]) -> str:
        """The layout as a table: a row per stage, a column per replica, the engines of each
        stage's tensor-parallel group (tensor rank order) in the cells."""
        rows = [("stage", "name") + tuple(f"replica {k}" for k in range(self.replicas))]
        for s, name in enumerate(names):
            rows.append((str(s), name) + tuple(", ".join(map(str, self.group(s, k)))
                                              for k in range(self.replicas)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
