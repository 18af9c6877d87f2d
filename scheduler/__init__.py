"""hotbed's scheduler daemon: request intake, placement, warm pools, the reaper."""
