//! The blog from cache-invalidation practice as a small HTTP service: PostgreSQL is the source
//! of truth, invalbus caches the reads, and every update invalidates what it changed, versioned
//! and after its transaction commits.
//!
//! # Layout
//! - [`Settings`]: where the database and NATS are, and who this replica is.
//! - [`Blog`]: the service: two database connections (reads are pipelined on one, transactions
//!   run on the other), the bus, and its two caches.
//! - [`router`]: the HTTP routes.
//!
//! # What is cached and how it is invalidated
//! - `GET /articles/{slug}`: cache `articles`, key = slug, tags `articles` and `author:<id>`,
//!   version = the row's `version` column. The tags let an operator purge one author's articles
//!   or all of them (`invalbus-node purge --tag author:42`).
//! - `GET /articles`: cache `lists`, key `all`, tag `articles`.
//! - `GET /authors/{id}/articles`: cache `lists`, key `author:<id>`, tag `author:<id>`.
//! - `PUT /articles/{slug}` runs one transaction that bumps `version`; after the commit it
//!   invalidates the key at the new version, and the tags `articles` and `author:<id>` in the
//!   `lists` cache. Invalidating after the commit matters: before it, a replica could reload
//!   the old row and cache it again. The version makes the order of events irrelevant: a load
//!   that read the old row before the commit can never be cached over the invalidation.
//!   The response says which version was written and the sequence of the batch that carries
//!   the invalidation (`batch_seq`), once the bus has accepted it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use invalbus::{Bus, Cache, CacheConfig, JetStreamConfig, Loaded};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_postgres::NoTls;

/// One article as stored and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Article {
    pub slug: String,
    pub author_id: i64,
    pub title: String,
    pub body: String,
    pub version: i64,
}

/// An article in a list (no body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub slug: String,
    pub author_id: i64,
    pub title: String,
    pub version: i64,
}

/// The body of `PUT /articles/{slug}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Update {
    pub title: String,
    pub body: String,
}

/// The body of `POST /articles`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewArticle {
    pub slug: String,
    pub author_id: i64,
    pub title: String,
    pub body: String,
}

/// The answer to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    /// The row's version after the write.
    pub version: i64,
    /// The sequence of the batch that carried the key's invalidation, in this replica's epoch.
    pub batch_seq: u64,
}

/// Where things are. [`Settings::from_env`] reads them from `BLOG_*` variables.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `postgres://user:password@host/db` or `host=… user=… dbname=…`.
    pub database_url: String,
    /// Schema of the tables (created if missing): lets several instances share a database.
    pub schema: String,
    /// NATS URL; `None` runs the bus in-process (one replica, for trying it out).
    pub nats_url: Option<String>,
    pub nats_user: Option<String>,
    pub nats_password: Option<String>,
    /// Bus namespace (default `blog`).
    pub namespace: String,
    /// This replica's node id (default: random).
    pub node_id: Option<String>,
    /// JetStream stream replicas (0: no JetStream).
    pub jetstream_replicas: usize,
}

impl Settings {
    /// `BLOG_DATABASE_URL` (default `host=127.0.0.1 user=postgres dbname=test`), `BLOG_SCHEMA`
    /// (`blog`), `BLOG_NATS`, `BLOG_NATS_USER`, `BLOG_NATS_PASSWORD`, `BLOG_NAMESPACE` (`blog`),
    /// `BLOG_NODE_ID`, `BLOG_JETSTREAM_REPLICAS` (1; 0 turns JetStream off).
    pub fn from_env() -> Result<Settings, Error> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Ok(Settings {
            database_url: var("BLOG_DATABASE_URL").unwrap_or_else(|| "host=127.0.0.1 user=postgres dbname=test".into()),
            schema: var("BLOG_SCHEMA").unwrap_or_else(|| "blog".into()),
            nats_url: var("BLOG_NATS"),
            nats_user: var("BLOG_NATS_USER"),
            nats_password: var("BLOG_NATS_PASSWORD"),
            namespace: var("BLOG_NAMESPACE").unwrap_or_else(|| "blog".into()),
            node_id: var("BLOG_NODE_ID"),
            jetstream_replicas: match var("BLOG_JETSTREAM_REPLICAS") {
                Some(n) => n
                    .parse()
                    .map_err(|_| Error::Config(format!("BLOG_JETSTREAM_REPLICAS={n}: not a number")))?,
                None => 1,
            },
        })
    }
}

/// What can go wrong; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("bus: {0}")]
    Bus(String),
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    Conflict,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = match &self {
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::Conflict => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        (status, self.to_string()).into_response()
    }
}

/// The service: database, bus and caches.
pub struct Blog {
    /// Reads: tokio-postgres pipelines concurrent queries on one connection.
    reader: tokio_postgres::Client,
    /// Writes: one transaction at a time needs the client exclusively.
    writer: Mutex<tokio_postgres::Client>,
    schema: String,
    bus: Bus,
    articles: Cache<Article>,
    lists: Cache<Vec<Summary>>,
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::error!(error = %e, "database connection lost");
        }
    });
    Ok(client)
}

impl Blog {
    /// Connects to the database (creating the schema and table if missing) and joins the bus.
    pub async fn start(settings: &Settings) -> Result<Blog, Error> {
        if settings.schema.is_empty()
            || !settings
                .schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::Config(format!(
                "schema {:?}: use lowercase letters, digits and '_'",
                settings.schema
            )));
        }
        let reader = connect(&settings.database_url).await?;
        let writer = connect(&settings.database_url).await?;
        let s = &settings.schema;
        writer
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {s}.articles (
                     slug text PRIMARY KEY,
                     author_id bigint NOT NULL,
                     title text NOT NULL,
                     body text NOT NULL,
                     version bigint NOT NULL DEFAULT 1,
                     updated_at timestamptz NOT NULL DEFAULT now()
                 );
                 CREATE INDEX IF NOT EXISTS articles_author ON {s}.articles (author_id);"
            ))
            .await?;

        let mut builder = Bus::builder().namespace(settings.namespace.clone());
        builder = match &settings.nats_url {
            Some(url) => {
                let mut options = async_nats::ConnectOptions::new();
                if let (Some(u), Some(p)) = (&settings.nats_user, &settings.nats_password) {
                    options = async_nats::ConnectOptions::with_user_and_password(u.clone(), p.clone());
                }
                let mut b = builder.nats(url.clone()).nats_options(options);
                if settings.jetstream_replicas > 0 {
                    b = b.jetstream(JetStreamConfig::default().replicas(settings.jetstream_replicas));
                }
                b
            }
            None => builder.in_process(&invalbus::InProcessHub::new()),
        };
        if let Some(id) = &settings.node_id {
            builder = builder.node_id(id.clone());
        }
        let bus = builder.build().await.map_err(|e| Error::Bus(e.to_string()))?;
        let config = CacheConfig::new(100_000).time_to_live(Duration::from_secs(300));
        let articles = bus
            .cache::<Article>("articles", config.clone())
            .map_err(|e| Error::Bus(e.to_string()))?;
        let lists = bus
            .cache::<Vec<Summary>>("lists", config)
            .map_err(|e| Error::Bus(e.to_string()))?;
        Ok(Blog {
            reader,
            writer: Mutex::new(writer),
            schema: s.clone(),
            bus,
            articles,
            lists,
        })
    }

    /// The bus (for its node id, stats, applied batches).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The article cache.
    pub fn articles(&self) -> &Cache<Article> {
        &self.articles
    }

    /// One article, through the cache.
    pub async fn article(&self, slug: &str) -> Result<Article, Error> {
        let s = &self.schema;
        let query = format!("SELECT slug, author_id, title, body, version FROM {s}.articles WHERE slug = $1");
        let loaded = self
            .articles
            .get_or_load(slug, || async {
                let row = self.reader.query_opt(&query, &[&slug]).await?.ok_or(Error::NotFound)?;
                let a = Article {
                    slug: row.get(0),
                    author_id: row.get(1),
                    title: row.get(2),
                    body: row.get(3),
                    version: row.get(4),
                };
                let version = u64::try_from(a.version).unwrap_or(0);
                let author = format!("author:{}", a.author_id);
                Ok::<_, Error>(Loaded::new(a).tag("articles").tag(author).version(version))
            })
            .await;
        loaded.map_err(unwrap_load_error)
    }

    /// Every article, newest first, through the cache.
    pub async fn list(&self) -> Result<Vec<Summary>, Error> {
        self.summaries("all", "articles", None).await
    }

    /// The articles of one author, through the cache.
    pub async fn by_author(&self, author_id: i64) -> Result<Vec<Summary>, Error> {
        let tag = format!("author:{author_id}");
        self.summaries(&tag, &tag, Some(author_id)).await
    }

    async fn summaries(&self, key: &str, tag: &str, author: Option<i64>) -> Result<Vec<Summary>, Error> {
        let s = &self.schema;
        let loaded = self
            .lists
            .get_or_load(key, || async {
                let rows = match author {
                    Some(id) => {
                        let q = format!(
                            "SELECT slug, author_id, title, version FROM {s}.articles WHERE author_id = $1 ORDER BY updated_at DESC, slug"
                        );
                        self.reader.query(&q, &[&id]).await?
                    }
                    None => {
                        let q = format!(
                            "SELECT slug, author_id, title, version FROM {s}.articles ORDER BY updated_at DESC, slug"
                        );
                        self.reader.query(&q, &[]).await?
                    }
                };
                let list = rows
                    .iter()
                    .map(|r| Summary {
                        slug: r.get(0),
                        author_id: r.get(1),
                        title: r.get(2),
                        version: r.get(3),
                    })
                    .collect();
                Ok::<_, Error>(Loaded::new(list).tag(tag))
            })
            .await;
        loaded.map_err(unwrap_load_error)
    }

    /// Updates an article: one transaction bumps its version; after the commit, the key is
    /// invalidated at the new version and the lists that show it are purged.
    pub async fn update(&self, slug: &str, update: &Update) -> Result<Written, Error> {
        let s = &self.schema;
        let (version, author_id) = {
            let mut db = self.writer.lock().await;
            let tx = db.transaction().await?;
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE {s}.articles SET title = $2, body = $3, version = version + 1, updated_at = now()
                         WHERE slug = $1 RETURNING version, author_id"
                    ),
                    &[&slug, &update.title, &update.body],
                )
                .await?
                .ok_or(Error::NotFound)?;
            let written: (i64, i64) = (row.get(0), row.get(1));
            tx.commit().await?;
            written
        };
        // After the commit, never before: see the module docs.
        let ticket = self
            .articles
            .invalidate_version(slug, u64::try_from(version).unwrap_or(0))
            .await
            .map_err(|e| Error::Bus(e.to_string()))?;
        self.invalidate_lists(author_id).await?;
        let published = ticket.published().await.map_err(|e| Error::Bus(e.to_string()))?;
        Ok(Written {
            version,
            batch_seq: published.seq,
        })
    }

    /// Creates an article at version 1 and purges the lists it appears in.
    pub async fn create(&self, new: &NewArticle) -> Result<Written, Error> {
        let s = &self.schema;
        let inserted = {
            let db = self.writer.lock().await;
            db.execute(
                &format!(
                    "INSERT INTO {s}.articles (slug, author_id, title, body) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (slug) DO NOTHING"
                ),
                &[&new.slug, &new.author_id, &new.title, &new.body],
            )
            .await?
        };
        if inserted == 0 {
            return Err(Error::Conflict);
        }
        // A failed load ("not found") is never cached, so only the lists are out of date.
        let ticket = self.invalidate_lists(new.author_id).await?;
        let published = ticket.published().await.map_err(|e| Error::Bus(e.to_string()))?;
        Ok(Written {
            version: 1,
            batch_seq: published.seq,
        })
    }

    /// Purges the lists an article of `author_id` appears in; returns the ticket of the last.
    async fn invalidate_lists(&self, author_id: i64) -> Result<invalbus::Ticket, Error> {
        let bus_err = |e: invalbus::InvalidateError| Error::Bus(e.to_string());
        self.lists.invalidate_tag("articles").await.map_err(bus_err)?;
        self.lists
            .invalidate_tag(&format!("author:{author_id}"))
            .await
            .map_err(bus_err)
    }

    /// Publishes what is queued and leaves the bus.
    pub async fn shutdown(&self) {
        self.bus.shutdown().await;
    }
}

/// A loader's own error comes back boxed inside the cache's `LoadError`; get it out so that
/// "not found" stays a 404.
fn unwrap_load_error(e: invalbus::LoadError) -> Error {
    let inner: &(dyn std::error::Error + 'static) = &*e.0;
    match inner.downcast_ref::<Error>() {
        Some(Error::NotFound) => Error::NotFound,
        _ => Error::Bus(format!("load failed: {e}")),
    }
}

async fn get_article(State(blog): State<Arc<Blog>>, Path(slug): Path<String>) -> Result<Json<Article>, Error> {
    blog.article(&slug).await.map(Json)
}

async fn put_article(
    State(blog): State<Arc<Blog>>,
    Path(slug): Path<String>,
    Json(update): Json<Update>,
) -> Result<Json<Written>, Error> {
    blog.update(&slug, &update).await.map(Json)
}

async fn list_articles(State(blog): State<Arc<Blog>>) -> Result<Json<Vec<Summary>>, Error> {
    blog.list().await.map(Json)
}

async fn post_article(State(blog): State<Arc<Blog>>, Json(new): Json<NewArticle>) -> Result<Json<Written>, Error> {
    blog.create(&new).await.map(Json)
}

async fn author_articles(State(blog): State<Arc<Blog>>, Path(id): Path<i64>) -> Result<Json<Vec<Summary>>, Error> {
    blog.by_author(id).await.map(Json)
}

/// Up as long as the process answers: a replica that cannot serve from its caches (cut off
/// from NATS, repairing) still answers correctly, from the database.
async fn healthz() -> &'static str {
    "ok"
}

/// The HTTP routes of the service.
pub fn router(blog: Arc<Blog>) -> Router {
    Router::new()
        .route("/articles", get(list_articles).post(post_article))
        .route("/articles/{slug}", get(get_article).put(put_article))
        .route("/authors/{id}/articles", get(author_articles))
        .route("/healthz", get(healthz))
        .with_state(blog)
}
