//! The bottom floor: bytes on disk. WebDataset tar shards read and written ([`webdataset`]),
//! the `index.json` beside them ([`index`]), image files recognised and decoded as PIL would
//! ([`image`]), Parquet and Arrow IPC tables read a part at a time ([`table`]). Nothing here
//! knows of datasets, plans or threads.

pub mod image;
pub mod index;
pub mod table;
pub mod webdataset;
