pub mod bench;
pub mod data;
pub mod export;
pub mod launch;
pub mod train;
