//! The last good version of each of the mesh's own objects of one kind, across builds: an
//! object the agent cannot use is reported with its kind, name and field, and its last good
//! version stays in force (one never seen good is left out), so a bad edit changes nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

/// The last good conversion of each object (by namespace and name).
#[derive(Debug)]
pub struct LastGood<T>(Arc<Mutex<HashMap<(String, String), T>>>);

impl<T> Clone for LastGood<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Default for LastGood<T> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<T: Clone> LastGood<T> {
    /// What each of `objects` makes: `convert(namespace, name, object)` if it can, else the
    /// object's last good version, if any; each failure goes to `refused` as
    /// `<kind> <namespace>/<name>: <why> (...)`. Objects no longer listed are forgotten.
    pub fn convert<K: k8s_openapi::Resource + kube::Resource>(
        &self,
        objects: &[Arc<K>],
        convert: impl Fn(&str, &str, &K) -> Result<T, String>,
        refused: &mut Vec<String>,
    ) -> Vec<T> {
        let mut last_good = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut present = Vec::new();
        let mut made = Vec::new();
        for object in objects {
            let meta = object.meta();
            let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref())
            else {
                continue;
            };
            let key = (namespace.to_owned(), name.to_owned());
            match convert(namespace, name, object) {
                Ok(good) => {
                    last_good.insert(key.clone(), good.clone());
                    made.push(good);
                }
                Err(why) => {
                    let kept = last_good.get(&key).cloned();
                    let what = match kept {
                        Some(_) => "its last good version stays",
                        None => "left out",
                    };
                    let kind = <K as k8s_openapi::Resource>::KIND;
                    refused.push(format!("{kind} {namespace}/{name}: {why} ({what})"));
                    made.extend(kept);
                }
            }
            present.push(key);
        }
        last_good.retain(|key, _| present.contains(key));
        made
    }
}
