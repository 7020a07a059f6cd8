"""`Cohort`: one Ray trial's configurations, trained as populations whose slots are refilled.

A trial starts with the points (sampled configurations) its searcher gave it; each point x
each seed is a member, and members of one shape train together as one Population. With a
pruner (`--pruner`), after every epoch each point's objective (the mean over its seeds) goes
to the sweep's study actor (ufw/sweep/study_service.py), which answers which points to stop;
and a point whose members are all done (pruned, early-stopped, at max_epochs, failed) hands
its slots to a new point asked from the same actor, like continuous batching in LLM serving:
the population keeps its size and its compiled graph. The trial ends when the actor has no
configuration left and every member is done.

A member's result row is kept when it leaves its slot, so the trial's final rows cover every
point it trained, in the order they were given.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ufw.config import UniversalConfig
from ufw.sweep.members import Member, expand_members, failed_rows, objective_means


class Cohort:
    """The trial's points, their members, and which population slot each member holds."""

    def __init__(self, spec: dict[str, Any], make_population):
        self.spec = spec
        self.make_population = make_population  # list[UniversalConfig] -> Population
        self.points: list[dict[str, Any]] = []
        self.numbers: list[int | None] = []  # each point's Optuna trial number
        self.members: list[Member] = []
        self.by_point: list[list[Member]] = []  # each point's members (its seeds)
        self.populations: list = []
        self.slots: dict[int, tuple[int, int]] = {}  # member index -> (population, slot)
        self.rows: dict[int, dict[str, Any]] = {}  # rows of members that left their slots
        self.ended_at: dict[int, float] = {}  # point -> when its last member was done
        self.told: set[int] = set()  # points whose result went to the study
        self.pruned: set[int] = set()  # points the pruner stopped
        self._current: dict[tuple[int, int], dict[str, Any]] | None = None  # slot rows, cached

    # ------------------------------------------------------------------ points
    def add(self, points: list[dict[str, Any]], numbers: list[int | None],
            free: list[tuple[int, list[int]]] | None = None) -> list[int]:
        """Give new points members. Without `free`: new populations, grouped by shape. With
        `free` (refill): the slots of a population that can host the point; a point that fits
        none is left out, and its index returned: it waits for a later refill (or for a
        population of its own once this trial's are done: `Refill.fill`), so that refills of
        another shape do not start a new population, with its own compilation, every epoch."""
        refilling, free = free is not None, list(free or [])
        new_groups: dict[tuple, list[Member]] = {}
        refills: dict[int, list[tuple[int, Member]]] = {}  # population -> (slot, member)
        waiting = []
        for i, (values, number) in enumerate(zip(points, numbers)):
            members = expand_members(self.spec, [values])
            configs = [m.config for m in members]
            trains = all(c is not None for c in configs)
            place = next((f for f in free if trains and len(f[1]) == len(configs)
                          and self.populations[f[0]].can_host(configs[0])), None)
            if refilling and trains and place is None:
                waiting.append(i)
                continue
            first = len(self.points)
            self.points.append(values)
            self.numbers.append(number)
            self._register(members, first)
            if not trains:
                self.ended_at[first] = time.time()  # never trains: failed rows at the end
                continue
            if place is None:
                new_groups.setdefault(configs[0].shape_key, []).extend(members)
                continue
            free.remove(place)
            g, slots = place
            refills.setdefault(g, []).extend(zip(slots, members))
        for g, placed in refills.items():  # one write per tensor for a population's refills
            slots = [k for k, _ in placed]
            rows = self.populations[g].replace(slots, [m.config for _, m in placed])
            for (k, m), row in zip(placed, rows):
                self._retire(g, k, row)
                self.slots[m.index] = (g, k)
        self._current = None
        for group in new_groups.values():
            self.populations.append(self.make_population([m.config for m in group]))
            for k, m in enumerate(group):
                self.slots[m.index] = (len(self.populations) - 1, k)
        return waiting

    def _register(self, members: list[Member], point: int) -> None:
        """Members (of one point) take their places in the trial."""
        for m in members:
            m.index, m.point = len(self.members), point
            self.members.append(m)
        self.by_point.append(members)

    def _retire(self, g: int, k: int, row: dict[str, Any]) -> None:
        """Keep `row`, the result of the member that left slot k of population g."""
        index = next((i for i, place in self.slots.items() if place == (g, k)), None)
        if index is not None:
            self.rows[index] = row
            del self.slots[index]
        self._current = None

    # ------------------------------------------------------------------ training
    @property
    def finished(self) -> bool:
        return all(p.finished for p in self.populations)

    def run_epoch(self) -> list[dict[str, Any]]:
        """One epoch of every population still training: its members' epoch rows."""
        by_slot = {place: index for index, place in self.slots.items()}
        rows = []
        for g, population in enumerate(self.populations):
            if population.finished:
                continue
            for row in population.run_epoch():
                m = self.members[by_slot[(g, row["member"])]]
                row.update(member=m.index, seed=m.config.seed, config_id=m.config.config_id)
                rows.append(row)
        self._current = None
        self._mark_ended()
        return rows

    def _mark_ended(self) -> None:
        now = time.time()
        for point in self.running_points():
            if not any(
                    self.status(m.index) == "running" for m in self.point_members(point)):
                self.ended_at[point] = now

    def status(self, index: int) -> str:
        if index in self.slots:
            g, k = self.slots[index]
            return self.populations[g].members[k].status
        return self.rows[index]["status"] if index in self.rows else "failed"

    def point_members(self, point: int) -> list[Member]:
        return self.by_point[point]

    def running_points(self) -> list[int]:
        """Points with a member still training."""
        return [p for p in range(len(self.points)) if p not in self.ended_at]

    def objective(self, point: int) -> float:
        """The point's first objective now: the mean over its seeds' rows (NaN: none)."""
        metric = self.spec["objectives"][0][0]
        values = []
        for m in self.point_members(point):
            row = self.row(m.index)
            value = row.get(metric)
            if value is not None and math.isfinite(float(value)):
                values.append(float(value))
        return sum(values) / len(values) if values else math.nan

    def prune(self, points: list[int]) -> None:
        for point in points:
            self.pruned.add(point)
            for m in self.point_members(point):
                if m.index in self.slots and self.status(m.index) == "running":
                    g, k = self.slots[m.index]
                    self.populations[g].prune(k)
            self.ended_at.setdefault(point, time.time())
        self._current = None

    def free_slots(self) -> list[tuple[int, list[int]]]:
        """(population, slots) of ended points still occupying slots: ready for refill."""
        free = []
        # the points holding slots, not every point the trial trained (thousands, refilled)
        for point in sorted({self.members[i].point for i in self.slots} & self.ended_at.keys()):
            places = [self.slots[m.index] for m in self.point_members(point)
                      if m.index in self.slots]
            if places and len({g for g, _ in places}) == 1:
                free.append((places[0][0], [k for _, k in places]))
        return free

    # ------------------------------------------------------------------ rows
    def _slot_rows(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Every slot's result row now (built once per change: K rows per population)."""
        if self._current is None:
            self._current = {(g, k): row for g, p in enumerate(self.populations)
                             for k, row in enumerate(p.results())}
        return self._current

    def row(self, index: int) -> dict[str, Any]:
        """Member `index`'s result row as it stands now."""
        if index in self.slots:
            return self._slot_rows()[self.slots[index]]
        if index in self.rows:
            return self.rows[index]
        m = self.members[index]
        return failed_rows(self.spec, [m], "")[0]

    def result_rows(self, extra: dict[str, Any]) -> list[dict[str, Any]]:
        """Every member's row, in order, with the trial's columns and its point's end."""
        rows = []
        for m in self.members:
            row = dict(self.row(m.index))
            if m.point in self.pruned and row.get("status") in ("running", "pruned"):
                row["status"] = "pruned"
            row.update(member=m.index, cohort_size=len(self.members), preset=m.preset, **extra)
            row["torch_version"] = str(row.get("torch_version"))
            row["ended_at"] = self.ended_at.get(m.point, math.nan)
            row["optuna_number"] = self.numbers[m.point]
            rows.append(row)
        return rows

    def untold_values(self) -> dict[int, list[float] | None]:
        """Per ended point not yet told to the study (not pruned, with a study number): its
        objectives' means over seeds (None: no seed has them)."""
        return {point: objective_means(self.spec, [self.row(m.index)
                                                   for m in self.point_members(point)])
                for point in sorted(self.ended_at.keys() - self.told)
                if point not in self.pruned and self.numbers[point] is not None}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points, "numbers": self.numbers,
                "configs": [[c.to_dict() for c in p.configs] for p in self.populations],
                "populations": [p.state_dict() for p in self.populations],
                "slots": [[i, g, k] for i, (g, k) in self.slots.items()],
                "rows": [[i, row] for i, row in self.rows.items()],
                "ended_at": [[p, t] for p, t in self.ended_at.items()],
                "told": sorted(self.told), "pruned": sorted(self.pruned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points, self.numbers, self.members, self.by_point = [], [], [], []
        for values, number in zip(state["points"], state["numbers"]):
            self.points.append(values)
            self.numbers.append(number)
            self._register(expand_members(self.spec, [values]), len(self.points) - 1)
        self.populations = []
        for configs, saved in zip(state["configs"], state["populations"]):
            population = self.make_population([UniversalConfig.from_dict(c) for c in configs])
            population.load_state_dict(saved)
            self.populations.append(population)
        self.slots = {i: (g, k) for i, g, k in state["slots"]}
        self.rows = dict(state["rows"])
        self.ended_at = dict(state["ended_at"])
        self.told, self.pruned = set(state["told"]), set(state["pruned"])
        self._current = None
