//! What an app needs to run the tasks of a bundle, in one `use`:
//!
//! ```no_run
//! use std::sync::Arc;
//! use taskpack::prelude::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::new(Arc::new(Bundle::open("tasks.tpk")?), EngineOptions::default())?;
//! let task = engine.task_index("mnist")?;
//! let image = Tensor::from_shape(&[1, 1, 28, 28], &[0f32; 784])?;
//! let outputs = engine.run(task, tvec![image.into()])?;
//! let class = argmax(outputs[0].to_plain_array_view::<f32>()?.as_slice().unwrap_or(&[]));
//! println!("class {class:?}");
//! # Ok(())
//! # }
//! ```

pub use crate::runtime::{
    argmax, tvec, Bundle, DatumType, Engine, EngineOptions, Error, IntoTValue, IoInfo, TValue,
    TVec, Tensor,
};
#[cfg(feature = "text")]
pub use crate::runtime::{Prediction, TextClassifier};
