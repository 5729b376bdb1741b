pub mod bench;
pub mod data;
pub mod launch;
pub mod train;
