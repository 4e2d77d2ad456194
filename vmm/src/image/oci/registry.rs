//! The registry side of a pull, through `oci-client` (the OCI distribution protocol:
//! manifests and indexes of both OCI and Docker schema 2 media types, bearer-token and
//! basic auth, digest checks of every blob). Its async runtime lives here alone: a
//! current-thread tokio runtime that each call blocks on, so the rest of kiln stays
//! synchronous.

use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::auth::Credentials;
use super::Platform;

/// A connection to one image's registry.
pub struct Registry {
    runtime: tokio::runtime::Runtime,
    client: Client,
    auth: RegistryAuth,
}

/// What the protocol reported, flattened to one line (the error and its causes).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RegistryError {
    pub message: String,
    /// The registry refused the credentials (or wants some).
    pub unauthorized: bool,
}

impl From<oci_client::errors::OciDistributionError> for RegistryError {
    fn from(e: oci_client::errors::OciDistributionError) -> Self {
        use oci_client::errors::OciDistributionError as E;
        let unauthorized = matches!(e, E::AuthenticationFailure(_) | E::UnauthorizedError { .. })
            || matches!(
                &e,
                E::ServerError {
                    code: 401 | 403,
                    ..
                }
            );
        RegistryError {
            message: one_line(&e),
            unauthorized,
        }
    }
}

/// `e` and its sources, joined on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = s.source();
    }
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Registry {
    /// A client that speaks HTTPS (system roots) except to the `insecure` hosts
    /// (`HOST[:PORT]` as the reference names them), picks `platform` out of an index, and
    /// uses `credentials` (anonymous without).
    pub fn new(
        insecure: &[String],
        platform: &Platform,
        credentials: Option<&Credentials>,
    ) -> Result<Registry, super::PullError> {
        // reqwest is built without a crypto provider of its own; ring is the one installed
        // here (a second install in the same process is refused, harmlessly). ring lacks
        // the post-quantum key exchange that rustls now deprecates it for, which a pull of
        // public image layers does not need; it builds in a fraction of aws-lc's time.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(super::PullError::Runtime)?;
        let wanted = platform.clone();
        let config = ClientConfig {
            protocol: if insecure.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(insecure.to_vec())
            },
            platform_resolver: Some(Box::new(move |entries: &[ImageIndexEntry]| {
                entries
                    .iter()
                    .find(|e| e.platform.as_ref().is_some_and(|p| wanted.matches(p)))
                    .map(|e| e.digest.clone())
            })),
            ..ClientConfig::default()
        };
        // `Client::new` falls back to a default client and panics when that fails too
        // (as it does on a host without CA certificates): build it here and say why.
        let client =
            Client::try_from(config).map_err(|e| super::PullError::Client(one_line(&e)))?;
        let auth = match credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        Ok(Registry {
            runtime,
            client,
            auth,
        })
    }

    /// The image manifest `reference` names (through an index, the one for the platform)
    /// and that manifest's digest.
    pub fn manifest(
        &self,
        reference: &Reference,
    ) -> Result<(OciImageManifest, String), RegistryError> {
        let (manifest, digest, _list) = self.runtime.block_on(
            self.client
                .pull_image_manifest_and_list_digest(reference, &self.auth),
        )?;
        Ok((manifest, digest))
    }

    /// A small blob (the image config) in memory, its digest checked.
    pub fn blob(
        &self,
        reference: &Reference,
        desc: &OciDescriptor,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut out = Vec::new();
        self.runtime
            .block_on(self.client.pull_blob(reference, desc, &mut out))?;
        Ok(out)
    }

    /// A blob (a layer) written to the file `path`, its digest checked.
    pub fn blob_to_file(
        &self,
        reference: &Reference,
        desc: &OciDescriptor,
        path: &Path,
    ) -> Result<(), RegistryError> {
        self.runtime.block_on(async {
            let file = tokio::fs::File::create(path)
                .await
                .map_err(|e| RegistryError {
                    message: format!("cannot create {}: {e}", path.display()),
                    unauthorized: false,
                })?;
            self.client
                .pull_blob(reference, desc, file)
                .await
                .map_err(RegistryError::from)
        })
    }
}
