//! guardian-server: the reference backend of guardian-sync's wire protocol v1.
#![warn(missing_docs)]
