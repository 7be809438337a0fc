"""Where expert weights live: the interface the model calls (store), the SSD reader (direct_io,
expert_reads), the byte-budgeted RAM tier (cache, ram) and the accelerator tier."""
