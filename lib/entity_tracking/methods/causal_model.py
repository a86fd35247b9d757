"""The paper's entity-tracking mechanism as a high-level causal model: the known answer a planted
model is trained to implement and every method is scored against (issue 29).

Prakash et al. (§2-§4) describe a chain of four variables on a prompt such as
``The apple is in Box F, the cup is in Box A, ... . Box A contains the``:

* ``query_label`` -- the label the query names (``A``), read at the query label by the
  **Position Detector**; the Structure Reader's role (what the query looks up) is folded in here;
* ``position`` -- the ordinal index ``i`` of the context segment whose label matches it (1 for
  ``A`` above, counting from 0), found by the **Position Detector** and carried to the last token
  by the **Position Transmitter** (one variable: the transmitter copies the detector's value);
* ``value`` -- the object at segment ``i`` (``cup``), fetched at the last token by the **Value
  Fetcher**; it is the answer.

An *interchange intervention* runs the base prompt with one variable set to its value on a source
prompt. Its answers are the paper's DCM desiderata (:data:`entity_tracking.task.DESIDERATA`):
``position`` from the source gives the base's object at the source's index (``positional``),
``value`` gives the source's own answer (``object_value``), ``query_label`` gives the base's
object in the box the source asks about (``box_label_value``). The position the desiderata count
is the queried segment's index among the source's *original* segments (a segment that a
desideratum adds, ``add_seg_start``, is not counted): :func:`interchange` reads it from the pair's
``source_query_index`` when the pair has one.

>>> base = {"objects": ["apple", "cup", "key"], "labels": ["F", "A", "T"], "query_label": "A"}
>>> source = {"objects": ["pen", "map", "bag"], "labels": ["Q", "R", "F"], "query_label": "F"}
>>> run(base).value, interchange({"base": base, "source": source}, "position")
('cup', 'key')
>>> interchange({"base": base, "source": source}, "value"), interchange({"base": base, "source": source}, "query_label")
('bag', 'apple')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ["CausalModelError", "GROUP_VARIABLE", "State", "VARIABLES", "interchange", "run"]

#: The high-level variables, in the order they are computed.
VARIABLES: tuple[str, ...] = ("query_label", "position", "value")

#: Which variable each of the paper's head groups implements (the planted model's alignment).
GROUP_VARIABLE: dict[str, str] = {"structure_reader": "query_label", "position_detector": "position",
                                  "position_transmitter": "position", "value_fetcher": "value"}


class CausalModelError(ValueError):
    """A prompt or an intervention the causal model cannot run: it names the field or the value."""


@dataclass(frozen=True)
class State:
    """The values of the high-level variables on one prompt; ``answer`` is ``value``."""

    query_label: str
    position: int
    value: str

    @property
    def answer(self) -> str:
        return self.value


def _fields(prompt: Mapping[str, Any]) -> tuple[list[str], list[str], str]:
    missing = [k for k in ("objects", "labels", "query_label") if k not in prompt]
    if missing:
        raise CausalModelError(f"the prompt has no {missing} (a prompt record of entity_tracking.task)")
    objects, labels = list(prompt["objects"]), list(prompt["labels"])
    if len(objects) != len(labels):
        raise CausalModelError(f"the prompt has {len(objects)} objects for {len(labels)} labels")
    return objects, labels, str(prompt["query_label"])


def run(prompt: Mapping[str, Any], set_to: Optional[Mapping[str, Any]] = None) -> State:
    """The causal model on ``prompt`` (``objects``, ``labels``, ``query_label``), with the
    variables in ``set_to`` fixed to the values given instead of computed (an intervention).

    A ``query_label`` absent from the context, or a ``position`` outside it, is an error: the
    model has no answer there."""
    set_to = dict(set_to or {})
    unknown = sorted(set(set_to) - set(VARIABLES))
    if unknown:
        raise CausalModelError(f"unknown variable(s) {unknown}; the variables are {list(VARIABLES)}")
    objects, labels, query = _fields(prompt)
    query = str(set_to.get("query_label", query))
    if "position" in set_to:
        position = int(set_to["position"])
        if not 0 <= position < len(objects):
            raise CausalModelError(f"position {position} is outside the context's {len(objects)} segments")
    elif query in labels:
        position = labels.index(query)
    else:
        raise CausalModelError(f"the query label {query!r} is not among the context's labels {labels}")
    value = str(set_to.get("value", objects[position]))
    return State(query, position, value)


def interchange(pair: Mapping[str, Any], variable: str) -> str:
    """The answer of ``pair["base"]`` with ``variable`` set to its value on ``pair["source"]``
    (an interchange intervention). The source's ``position`` is the pair's ``source_query_index``
    when it has one (the desiderata count original segments only), else computed."""
    if variable not in VARIABLES:
        raise CausalModelError(f"unknown variable {variable!r}; the variables are {list(VARIABLES)}")
    for side in ("base", "source"):
        if side not in pair:
            raise CausalModelError(f"the pair has no {side!r} prompt")
    if variable == "position" and pair.get("source_query_index") is not None:
        return run(pair["base"], {"position": int(pair["source_query_index"])}).answer
    return run(pair["base"], {variable: getattr(run(pair["source"]), variable)}).answer
