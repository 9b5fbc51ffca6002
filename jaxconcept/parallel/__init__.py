"""Devices and hosts: `sharding` (the (data, fsdp) mesh and its `NamedSharding`s) and `distributed`
(multi-host start-up and which process writes)."""
