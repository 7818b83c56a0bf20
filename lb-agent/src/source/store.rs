//! The agent's own store of objects, grouped by the Service they belong to,
//! so that a change recomputes only the Services it touches. Both sources
//! feed it: the API server per object (watch events), manifests per file
//! (what a changed file held before and holds now). Every update returns the
//! Services it touched ("dirty").

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
};

use crate::{
    model::ServiceName,
    source::objects::{Objects, Sourced},
    source::view::{ServiceView, SliceView},
};

/// An object's identity: where it came from, its namespace and name.
type ObjectKey = (Option<PathBuf>, Arc<str>, Arc<str>);

#[derive(Debug, Default)]
pub struct ObjectStore {
    /// Every definition of each Service, in the order they were added (more
    /// than one is an error; the first is used).
    services: BTreeMap<ServiceName, Vec<Sourced<ServiceView>>>,
    /// Slices by the Service their label names (a Vec: a Service has a few
    /// slices, and a map's node would reserve room for eleven).
    slices: BTreeMap<ServiceName, Vec<Sourced<SliceView>>>,
    /// Which Service each stored slice is filed under (to move it on relabel).
    slice_owner: BTreeMap<ObjectKey, ServiceName>,
    /// Services named by objects that did not parse, with how many.
    unparsed: BTreeMap<ServiceName, usize>,
}

/// What one Service's computation needs.
pub struct ServiceInput<'a> {
    pub definitions: &'a [Sourced<ServiceView>],
    pub slices: Vec<&'a Sourced<SliceView>>,
    pub unparsed: bool,
}

fn service_name(view: &ServiceView) -> ServiceName {
    ServiceName {
        namespace: view.namespace.clone(),
        name: view.name.clone(),
    }
}

fn slice_key(slice: &Sourced<SliceView>) -> ObjectKey {
    (
        slice.file.clone(),
        slice.object.namespace.clone(),
        slice.object.name.clone(),
    )
}

impl ObjectStore {
    pub fn from_objects(objects: &Objects) -> Self {
        let mut store = Self::default();
        store.add(objects);
        store
    }

    /// Every Service named by anything in the store.
    pub fn names(&self) -> BTreeSet<ServiceName> {
        self.services
            .keys()
            .chain(self.slices.keys())
            .chain(self.unparsed.keys())
            .cloned()
            .collect()
    }

    /// Every Service definition held.
    pub fn services(&self) -> impl Iterator<Item = &Sourced<ServiceView>> {
        self.services.values().flatten()
    }

    pub fn input(&self, name: &ServiceName) -> ServiceInput<'_> {
        ServiceInput {
            definitions: self
                .services
                .get(name)
                .map(Vec::as_slice)
                .unwrap_or_default(),
            slices: self
                .slices
                .get(name)
                .map(|s| {
                    // In a fixed order, whatever order they arrived in.
                    let mut sorted: Vec<&Sourced<SliceView>> = s.iter().collect();
                    sorted.sort_by_key(|slice| slice_key(slice));
                    sorted
                })
                .unwrap_or_default(),
            unparsed: self.unparsed.contains_key(name),
        }
    }

    /// Adds or replaces (same source file) a Service definition.
    pub fn upsert_service(&mut self, service: Sourced<ServiceView>) -> ServiceName {
        let name = service_name(&service.object);
        let definitions = self.services.entry(name.clone()).or_insert_with(one_slot);
        match definitions.iter_mut().find(|d| d.file == service.file) {
            Some(existing) => *existing = service,
            None => definitions.push(service),
        }
        name
    }

    pub fn remove_service(&mut self, service: &Sourced<ServiceView>) -> ServiceName {
        let name = service_name(&service.object);
        if let Some(definitions) = self.services.get_mut(&name) {
            definitions.retain(|d| d.file != service.file);
            if definitions.is_empty() {
                self.services.remove(&name);
            }
        }
        name
    }

    /// Adds or replaces a slice; returns the Services it left and joined.
    pub fn upsert_slice(&mut self, slice: Sourced<SliceView>) -> Vec<ServiceName> {
        let mut dirty = self.remove_slice(&slice);
        if let Some(label) = &slice.object.service_name {
            let name = ServiceName {
                namespace: slice.object.namespace.clone(),
                name: label.clone(),
            };
            self.slice_owner.insert(slice_key(&slice), name.clone());
            self.slices
                .entry(name.clone())
                .or_insert_with(one_slot)
                .push(slice);
            dirty.push(name);
        }
        dirty
    }

    pub fn remove_slice(&mut self, slice: &Sourced<SliceView>) -> Vec<ServiceName> {
        let key = slice_key(slice);
        let Some(owner) = self.slice_owner.remove(&key) else {
            return Vec::new();
        };
        if let Some(slices) = self.slices.get_mut(&owner) {
            slices.retain(|s| slice_key(s) != key);
            if slices.is_empty() {
                self.slices.remove(&owner);
            }
        }
        vec![owner]
    }

    /// Adds everything in `objects` (a file's content, a snapshot).
    pub fn add(&mut self, objects: &Objects) -> BTreeSet<ServiceName> {
        let mut dirty = BTreeSet::new();
        for service in &objects.services {
            // Pushed, not replaced: a file may define a Service twice (an error
            // the computation reports).
            let name = service_name(&service.object);
            self.services
                .entry(name.clone())
                .or_insert_with(one_slot)
                .push(service.clone());
            dirty.insert(name);
        }
        for slice in &objects.slices {
            dirty.extend(self.upsert_slice(slice.clone()));
        }
        for name in &objects.unparsed {
            *self.unparsed.entry(name.clone()).or_default() += 1;
            dirty.insert(name.clone());
        }
        dirty
    }

    /// Removes what an earlier `add` of the same `objects` added.
    pub fn remove(&mut self, objects: &Objects) -> BTreeSet<ServiceName> {
        let mut dirty = BTreeSet::new();
        for service in &objects.services {
            dirty.insert(self.remove_service(service));
        }
        for slice in &objects.slices {
            dirty.extend(self.remove_slice(slice));
        }
        for name in &objects.unparsed {
            if let Some(count) = self.unparsed.get_mut(name) {
                *count -= 1;
                if *count == 0 {
                    self.unparsed.remove(name);
                }
            }
            dirty.insert(name.clone());
        }
        dirty
    }

    /// Replaces every Service (an API relist); returns all names before and after.
    pub fn replace_services(
        &mut self,
        services: Vec<Sourced<ServiceView>>,
    ) -> BTreeSet<ServiceName> {
        let mut dirty: BTreeSet<ServiceName> = self.services.keys().cloned().collect();
        self.services.clear();
        for service in services {
            dirty.insert(self.upsert_service(service));
        }
        dirty
    }

    /// Replaces every slice (an API relist); returns all Services touched.
    pub fn replace_slices(&mut self, slices: Vec<Sourced<SliceView>>) -> BTreeSet<ServiceName> {
        let mut dirty: BTreeSet<ServiceName> = self.slices.keys().cloned().collect();
        self.slices.clear();
        self.slice_owner.clear();
        for slice in slices {
            dirty.extend(self.upsert_slice(slice));
        }
        dirty
    }
}

/// Room for one: nearly every name has one Service and one slice, and
/// `Vec`'s growth from empty reserves four (unused room that adds up to
/// megabytes at 10 000 Services).
fn one_slot<T>() -> Vec<T> {
    Vec::with_capacity(1)
}
