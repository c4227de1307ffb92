//! Skiff's control plane: the revisioned store every other part stands on;
//! the API server, scheduler and controllers build on it.

pub mod apiserver;
pub mod controllers;
pub mod leader;
pub mod scheduler;
pub mod storage;
