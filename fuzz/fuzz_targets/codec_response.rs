//! Fuzz target `codec_response`: see `membroker_fuzz::codec::response`.
#![cfg_attr(fuzzing, no_main)]

membroker_fuzz::fuzz_main!("codec_response", membroker_fuzz::codec::response);
