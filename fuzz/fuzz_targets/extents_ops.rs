//! Fuzz target `extents_ops`: see `membroker_fuzz::extents::ops`.
#![cfg_attr(fuzzing, no_main)]

membroker_fuzz::fuzz_main!("extents_ops", membroker_fuzz::extents::ops);
