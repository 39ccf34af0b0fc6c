//! SQLite file handling shared by the outbox (`guardian-sync`) and the
//! reference server's store (`guardian-server`): both keep their data in a
//! SQLite file in WAL mode and commit at `synchronous=FULL`.

pub mod wal_prefill;
