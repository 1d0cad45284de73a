"""How a ComfyUI prompt is refused, in ComfyUI's own error shape: `error` ({type, message, details,
extra_info}) and `node_errors` naming each node and input at fault, as ComfyUI refuses a prompt that fails
validation."""

from __future__ import annotations

from dataclasses import dataclass


class GraphInvalid(Exception):
    """A prompt ComfyUI's way of answering refuses: `error` ({type, message, details, extra_info}) and
    `node_errors` ({node id: {errors, dependent_outputs, class_type}})."""

    def __init__(self, kind: str, message: str, details: str = "", node_errors: dict | None = None):
        super().__init__(f"{message}: {details}" if details else message)
        self.kind, self.message, self.details, self.node_errors = kind, message, details, node_errors or {}

    def body(self) -> dict:
        return {"error": {"type": self.kind, "message": self.message, "details": self.details, "extra_info": {}},
                "node_errors": self.node_errors}


@dataclass(frozen=True)
class NodeProblem:
    node: str
    kind: str  # ComfyUI's error type: required_input_missing, value_not_in_list, invalid_input_type, ...
    message: str
    input_name: str | None = None


def failed_validation(problems: list[NodeProblem], classes: dict[str, str], outputs: dict[str, str]) -> GraphInvalid:
    """ComfyUI's answer to a prompt whose nodes fail its checks: each problem under its node."""
    errors: dict[str, dict] = {}
    for problem in problems:
        entry = errors.setdefault(problem.node, {"errors": [], "dependent_outputs": sorted(outputs), "class_type": classes[problem.node]})
        entry["errors"].append({
            "type": problem.kind, "message": problem.message,
            "details": f"{problem.input_name}: {problem.message}" if problem.input_name else problem.message,
            "extra_info": {"input_name": problem.input_name} if problem.input_name else {},
        })
    return GraphInvalid("prompt_outputs_failed_validation", "Prompt outputs failed validation", "", errors)
