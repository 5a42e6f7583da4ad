//! Fuzz target `codec_request`: see `membroker_fuzz::codec::request`.
#![cfg_attr(fuzzing, no_main)]

membroker_fuzz::fuzz_main!("codec_request", membroker_fuzz::codec::request);
