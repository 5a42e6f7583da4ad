//! Fuzz target `journal_replay`: see `membroker_fuzz::journal::replay`.
#![cfg_attr(fuzzing, no_main)]

membroker_fuzz::fuzz_main!("journal_replay", membroker_fuzz::journal::replay);
