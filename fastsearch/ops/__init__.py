"""Op families: schema, reference, fake implementation, checks and public function, one module each."""

from fastsearch.ops.noise import randn, zo_neighbors
from fastsearch.ops.steps import ddim_step, flow_euler_step, flow_heun_step, renoise

__all__ = ["ddim_step", "flow_euler_step", "flow_heun_step", "randn", "renoise", "zo_neighbors"]
