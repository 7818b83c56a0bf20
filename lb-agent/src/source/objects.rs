//! The objects a pass reconciles, independent of their source (a manifest
//! directory or the API server): the slim views of Services and
//! EndpointSlices, and the Services whose input did not parse.

use std::path::PathBuf;

use crate::{
    model::ServiceName,
    source::view::{ServiceView, SliceView},
};

/// An object and where it was read from.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub file: Option<PathBuf>,
    pub object: T,
}

impl<T> Sourced<T> {
    /// The object's view (see `view`), from the same file.
    pub fn view<'a, V: From<&'a T>>(&'a self) -> Sourced<V> {
        Sourced {
            file: self.file.clone(),
            object: V::from(&self.object),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Sourced<ServiceView>>,
    pub slices: Vec<Sourced<SliceView>>,
    /// Services named by an object that failed to parse (the Service itself,
    /// or a slice labelled with it): they keep their last good state.
    pub unparsed: Vec<ServiceName>,
}

impl Objects {
    pub fn extend(&mut self, other: &Objects) {
        self.services.extend(other.services.iter().cloned());
        self.slices.extend(other.slices.iter().cloned());
        self.unparsed.extend(other.unparsed.iter().cloned());
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty() && self.unparsed.is_empty()
    }
}
